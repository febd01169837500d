"""The study scripts in pipelines/ drive ``sirf-fbsem`` only: run with a recording stand-in for
``sirf-fbsem`` (``SIRF_FBSEM``), every command they issue is accepted by the real parser, the
phantom sets are disjoint by seed, each step is skipped once its output exists, and the
confirmation runs refuse to start while a training run is missing (scored once, complete).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sirf_fbsem.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "paper_findings_2d.sh"

# records argv and writes what the real command would write (the test parses the argv with the
# real parser, in-process: a stand-in that imported the package would start torch per command)
STAND_IN = """\
import json, sys
from pathlib import Path
argv = sys.argv[1:]
with open(LOG, "a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[0] == "export-model":
    Path(argv[argv.index("--output") + 1]).write_bytes(b"exported")
    sys.exit(0)
out = Path(argv[argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
if argv[0] == "simulate":
    (out / "manifest.json").write_text("{}")
elif argv[0] == "train":
    (out / "model.pt").write_bytes(b"")
elif argv[0] == "evaluate":
    name = argv[argv.index("--name") + 1] if "--name" in argv else "evaluate"
    level = {"targets_nrmse_by_stage": [0.5, 0.3, 0.2], "methods": {"osem": {"mean": {"nrmse": 0.25}}}}
    (out / f"{name}.json").write_text(json.dumps({"count_levels": {"3e+07": level}}) if name.startswith("floor")
                                      else "{}")
"""


def _run(tmp_path: Path, step: str, seeds: str = "0 1", script: Path = SCRIPT,
         env_extra: dict[str, str] | None = None,
         step_args: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    log = tmp_path / "calls.jsonl"
    stand_in = tmp_path / "sf.py"
    stand_in.write_text(f"LOG = {str(log)!r}\n" + STAND_IN)
    env = {**os.environ, "SIRF_FBSEM": f"{shlex.quote(sys.executable)} {shlex.quote(str(stand_in))}",
           "SEEDS": seeds, "PYTHONPATH": str(REPO), **(env_extra or {})}
    before = len(log.read_text().splitlines()) if log.exists() else 0
    proc = subprocess.run(["bash", str(script), str(tmp_path / "work"), step, *step_args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    calls = [json.loads(line) for line in log.read_text().splitlines()[before:]] if log.exists() else []
    parser = build_parser()
    for argv in calls:
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"the parser refuses a command of {script.name}: {argv}") from None
    return proc, calls


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _models(*runs: list[str]) -> set[str]:
    """The configuration names of every ``--model NAME=PATH`` of the evaluate commands ``runs``."""
    return {run[i + 1].split("=")[0] for run in runs for i, a in enumerate(run) if a == "--model"}


def _pipeline_module(name: str, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "pipelines"))  # the scripts import their siblings' rules
    spec = importlib.util.spec_from_file_location(name, REPO / "pipelines" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)  # dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod



def test_paper_findings_script_issues_valid_commands_on_disjoint_sets_and_resumes(tmp_path):
    proc, calls = _run(tmp_path, "all")
    assert proc.returncode == 0, proc.stderr
    sims = [c for c in calls if c[0] == "simulate"]
    trains = [c for c in calls if c[0] == "train"]
    evals = [c for c in calls if c[0] == "evaluate"]
    # training, tuning and confirmation sets per phantom kind: six sets, six distinct base seeds;
    # the seventh and eighth are the training sets again (same seeds) with 36 stages of targets; the
    # ninth a larger procedural training set on a seed of its own
    assert len(sims) == 9 and len({_flag(c, "--seed") for c in sims}) == 7
    by_out = {Path(_flag(c, "--out")).name: c for c in sims}
    for kind in ("proc", "mni"):
        assert _flag(by_out[f"train36_{kind}"], "--seed") == _flag(by_out[f"train_{kind}"], "--seed")
        assert _flag(by_out[f"train36_{kind}"], "--phantom") == _flag(by_out[f"train_{kind}"], "--phantom")
        assert _flag(by_out[f"train36_{kind}"], "--num-stages") == "36"
        assert _flag(by_out[f"train_{kind}"], "--num-stages") == "12"
    roles = {role: {_flag(c, "--seed") for n, c in by_out.items() if n.startswith(role)}
             for role in ("train", "tune", "confirm")}
    assert not (roles["train"] & roles["tune"] or roles["train"] & roles["confirm"] or roles["tune"] & roles["confirm"])
    # every configuration once per training seed, each into its own directory
    assert len(trains) == 2 * 27 and len({_flag(c, "--out") for c in trains}) == 54
    assert all(_flag(c, "--data").endswith("train60_proc") == ("_n60_" in _flag(c, "--out")) for c in trains)
    assert {_flag(c, "--seed") for c in trains} == {"0", "1"}
    assert all(("train36" in _flag(c, "--data")) == ("_k36_" in _flag(c, "--out")) for c in trains)
    assert all(_flag(c, "--data").endswith("train36_mni") == ("_mni_k36_" in _flag(c, "--out")) for c in trains)
    # two tuning runs (no --tune-data, no models), then twelve confirmation runs (with --tune-data):
    # K = 12 on both phantom kinds, K = 36 PET-only on both, K = 36 PET+MR (with the Bowsher grid),
    # K = 36 trained on MNI152 phantoms on both, with iteration-dependent and with fixed targets,
    # K = 36 fixed targets trained on procedural phantoms on both, K = 36 end-to-end (two networks),
    # K = 36 greedy and block-wise (two networks), K = 12 end-to-end trained on 60 phantoms (two networks),
    # then K = 36 with the MR image (fixed targets; end-to-end; trained on procedural phantoms on MNI152;
    # trained on MNI152 on both) and PET-only end-to-end trained on MNI152 phantoms
    tune, confirm = evals[:2], evals[2:]
    assert len(confirm) == 20 and all("--tune-data" not in c and "--model" not in c for c in tune)
    (proc_run, mni_run, proc36, mni36, pm36, mni36_mni, mni36_proc, truth36_mni, truth36_proc,
     truthp_proc, truthp_mni, e2e36, schemes36, e2e60, truth_pm, e2e_pm, e2e_mni, pm_on_mni, pm_mni_on_mni,
     pm_mni_on_proc) = confirm
    assert proc_run.count("--model") == 18 and mni_run.count("--model") == 8
    assert [c.count("--model") for c in confirm[2:]] == [2] * 9 + [4, 4, 4] + [2, 4, 4, 4, 4, 4]

    assert _models(truth_pm) == {"seq_truth_pm_k36"} and _models(e2e_pm) == {"e2e_pm_k36", "e2e_shared_pm_k36"}
    assert _models(e2e_mni) == {"e2e_mni_k36", "e2e_shared_mni_k36"}
    assert _models(pm_on_mni) == {"seq_osem_pm_k36", "seq_truth_pm_k36"}
    assert _models(pm_mni_on_mni, pm_mni_on_proc) == {"seq_osem_pm_mni_k36", "seq_truth_pm_mni_k36"}
    # every PET+MR run is scored against MR-guided MAP-EM, tuned on the same kind of phantoms
    assert all(("--bowsher" in run) == ("_pm" in str(_models(run))) for run in confirm[2:])
    pm_trains = [c for c in trains if "_pm_" in _flag(c, "--out")]
    assert len(pm_trains) == 2 * 7 and all("--anatomical" in c for c in pm_trains)
    assert _models(schemes36) == {"greedy_k36", "seq_block_k36"}
    assert _models(e2e60) == {"e2e_n60", "e2e_shared_n60"}
    assert _models(truthp_proc, truthp_mni) == {"seq_truth_k36"}
    assert _models(e2e36) == {"e2e_k36", "e2e_shared_k36"}
    assert _models(truth36_mni, truth36_proc) == {"seq_truth_mni_k36"}
    assert _models(proc36, mni36, pm36) == {"seq_osem_k36", "seq_osem_pm_k36"} and "--bowsher" in pm36
    assert _models(mni36_mni, mni36_proc) == {"seq_osem_mni_k36"}
    for run in confirm:
        kind = "mni" if run in (mni_run, mni36, mni36_mni, truth36_mni, truthp_mni, e2e_mni, pm_on_mni,
                                pm_mni_on_mni) else "proc"
        assert _flag(run, "--data").endswith(f"confirm_{kind}") and _flag(run, "--tune-data").endswith(f"tune_{kind}")
    # a second run trains and confirms nothing again
    proc, calls = _run(tmp_path, "all")
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls if c[0] == "train"]
    assert [c[0] for c in calls if c[0] == "evaluate"] == ["evaluate", "evaluate"]  # the tuning runs only


def test_paper_findings_confirmation_refuses_missing_runs(tmp_path):
    proc, calls = _run(tmp_path, "confirm")
    assert proc.returncode != 0 and "model.pt is missing: run the train step first" in proc.stderr
    assert not calls  # nothing scored


def test_paper_findings_trains_named_configurations_and_scores_each_run_once_its_models_exist(tmp_path):
    """``train NAME...`` trains only those configurations; ``confirm`` skips the runs already scored and
    scores a new one as soon as its own models exist, while a run whose models are missing stops it."""
    run, calls = _run(tmp_path, "train", step_args=("seq_truth_k36", "e2e_k63"))
    assert run.returncode == 2 and "unknown configuration 'e2e_k63'" in run.stderr and "e2e_k36" in run.stderr
    assert not calls  # a misspelt name is refused before any run
    run, trains = _run(tmp_path, "train", step_args=("seq_truth_k36", "e2e_k36"))
    assert run.returncode == 0, run.stderr
    assert sorted(Path(_flag(c, "--out")).name for c in trains) == ["e2e_k36_s0", "e2e_k36_s1", "seq_truth_k36_s0",
                                                                    "seq_truth_k36_s1"]
    # every earlier run already scored: only the new procedural fixed-target runs are scored, then the
    # end-to-end run stops the step because e2e_shared_k36 has not been trained
    results = tmp_path / "work" / "results"
    results.mkdir()
    for name in ("proc", "mni", "k36_proc", "k36_mni", "k36_pm_proc", "k36_mni_on_mni", "k36_mni_on_proc",
                 "k36_truth_mni_on_mni", "k36_truth_mni_on_proc"):
        (results / f"paper_findings_2d_{name}.json").write_text("{}")
    run, evals = _run(tmp_path, "confirm")
    assert run.returncode != 0 and "e2e_shared_k36_s0/model.pt is missing" in run.stderr
    assert [_flag(c, "--name") for c in evals] == ["paper_findings_2d_k36_truth_proc_on_proc",
                                                   "paper_findings_2d_k36_truth_proc_on_mni"]
    assert not (results / "paper_findings_2d_k36_e2e_proc.json").exists()


SCRIPT_3D = REPO / "pipelines" / "paper_findings_3d.sh"


def test_paper_findings_3d_trains_both_schemes_alike_on_disjoint_sets_and_scores_them_once(tmp_path):
    no_carried = {"CARRIED": str(tmp_path / "none")}  # not the runs carried in this checkout
    proc, calls = _run(tmp_path, "all", script=SCRIPT_3D, env_extra=no_carried)
    assert proc.returncode == 0, proc.stderr
    sims = [c for c in calls if c[0] == "simulate"]
    trains = [c for c in calls if c[0] == "train"]
    evals = [c for c in calls if c[0] == "evaluate"]
    # three sets on three seeds, all 3D (no --2d) with 21 stages of targets
    assert [Path(_flag(c, "--out")).name for c in sims] == ["train", "tune", "confirm"]
    assert len({_flag(c, "--seed") for c in sims}) == 3
    assert all("--2d" not in c and _flag(c, "--num-stages") == "21" for c in sims)
    # sequential and end-to-end per training seed, on the same data with the same recipe but the mode
    assert len(trains) == 4 and len({_flag(c, "--out") for c in trains}) == 4
    assert {_flag(c, "--mode") for c in trains} == {"sequential", "end_to_end"}
    def but_mode_and_out(argv: list[str]) -> list[str]:
        drop = {argv.index("--mode"), argv.index("--mode") + 1, argv.index("--out"), argv.index("--out") + 1}
        return [a for i, a in enumerate(argv) if i not in drop]

    seed0 = [but_mode_and_out(c) for c in trains if _flag(c, "--seed") == "0"]
    assert len(seed0) == 2 and seed0[0] == seed0[1] and _flag(trains[0], "--dims") == "3"
    # one tuning run (no models), then one confirmation run of both schemes' runs on the confirmation set
    tune, confirm = evals
    assert "--tune-data" not in tune and "--model" not in tune and _flag(tune, "--data").endswith("tune")
    assert _flag(confirm, "--data").endswith("confirm") and _flag(confirm, "--tune-data").endswith("tune")
    assert _models(confirm) == {"seq", "e2e"} and confirm.count("--model") == 4
    # the baselines' choices are made on the tuning run's grids, not computed again
    assert _flag(confirm, "--tuning-result") == str(Path(_flag(tune, "--out")) / f"{_flag(tune, '--name')}.json")
    # a second run does nothing again
    proc, calls = _run(tmp_path, "all", script=SCRIPT_3D, env_extra=no_carried)
    assert proc.returncode == 0, proc.stderr
    assert not calls
    # a set whose simulation stopped part-way (its manifest is written after every sample) is simulated
    # again, which resumes it
    (tmp_path / "work" / "data" / "tune" / ".simulated").unlink()
    proc, calls = _run(tmp_path, "simulate", script=SCRIPT_3D, env_extra=no_carried)
    assert proc.returncode == 0 and [Path(_flag(c, "--out")).name for c in calls] == ["tune"]


def test_paper_findings_3d_carries_runs_between_sessions(tmp_path):
    carried = tmp_path / "carried"
    stage = carried / "seq_s0" / "checkpoints" / "stage_001.pt"
    stage.parent.mkdir(parents=True)
    stage.write_bytes(b"stage 1")
    proc, calls = _run(tmp_path, "train", seeds="0", script=SCRIPT_3D, env_extra={"CARRIED": str(carried)})
    assert proc.returncode == 0, proc.stderr
    by_out = {Path(_flag(c, "--out")).name: c for c in calls}
    assert "--resume" in by_out["seq_s0"] and "--resume" not in by_out["e2e_s0"]
    work_stage = tmp_path / "work" / "runs" / "seq_s0" / "checkpoints" / "stage_001.pt"
    assert work_stage.read_bytes() == b"stage 1"
    # carry: each stopped run's stage or joint checkpoints back into CARRIED, in its own folder; not
    # the initial weights (train derives them from --seed)
    for run in ("seq_s0", "e2e_s0"):  # the stand-in's train wrote models; these runs have not finished
        (tmp_path / "work" / "runs" / run / "model.pt").unlink()
    e2e = tmp_path / "work" / "runs" / "e2e_s0" / "checkpoints"
    e2e.mkdir(parents=True)
    (e2e / "checkpoint.pt").write_bytes(b"e2e")
    (e2e / "initial.pt").write_bytes(b"initial")
    proc, _ = _run(tmp_path, "carry", seeds="0", script=SCRIPT_3D, env_extra={"CARRIED": str(carried)})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (carried / "e2e_s0" / "checkpoints").iterdir()) == ["checkpoint.pt"]
    assert (carried / "e2e_s0" / "checkpoints" / "checkpoint.pt").read_bytes() == b"e2e"
    assert stage.read_bytes() == b"stage 1"
    # a finished run goes as its model file alone (with its .json), its carried checkpoints dropped
    seq = tmp_path / "work" / "runs" / "seq_s0"
    (seq / "model.pt").write_bytes(b"seq model")
    (seq / "model.json").write_text("{}")
    proc, _ = _run(tmp_path, "carry", seeds="0", script=SCRIPT_3D, env_extra={"CARRIED": str(carried)})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (carried / "seq_s0").iterdir()) == ["model.json", "model.pt"]
    assert (carried / "e2e_s0" / "checkpoints" / "checkpoint.pt").is_file()
    # and on a fresh host train takes it as the run's model, training only the stopped run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc, calls = _run(fresh, "train", seeds="0", script=SCRIPT_3D, env_extra={"CARRIED": str(carried)})
    assert proc.returncode == 0, proc.stderr
    assert [Path(_flag(c, "--out")).name for c in calls] == ["e2e_s0"] and "--resume" in calls[0]
    assert (fresh / "work" / "runs" / "seq_s0" / "model.pt").read_bytes() == b"seq model"


def test_paper_findings_3d_carries_the_tuning_run_between_sessions(tmp_path):
    """A stopped tuning run resumes (--resume) from its partial results; carry takes them into CARRIED/eval,
    and a fresh host's tune step copies them back and resumes; once finished, carry keeps its JSON alone,
    which a fresh host's tune step takes without evaluating, and its confirmation run reads (--tuning-result)."""
    carried = tmp_path / "carried"
    env = {"CARRIED": str(carried)}
    first, fresh, third = (tmp_path / n for n in ("first", "fresh", "third"))
    for d in (first, fresh, third):
        d.mkdir()
    partial = first / "work" / "results" / "paper_findings_3d_tune.partial"
    partial.mkdir(parents=True)
    (partial / "grid_3e+06_0000.npz").write_bytes(b"grid 0")
    proc, _ = _run(first, "carry", script=SCRIPT_3D, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert (carried / "eval" / partial.name / "grid_3e+06_0000.npz").read_bytes() == b"grid 0"
    proc, calls = _run(fresh, "tune", script=SCRIPT_3D, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1 and "--resume" in calls[0]
    assert (fresh / "work" / "results" / partial.name / "grid_3e+06_0000.npz").read_bytes() == b"grid 0"
    # finished (the stand-in wrote the JSON; evaluate removes its partial results when it finishes)
    shutil.rmtree(fresh / "work" / "results" / partial.name)
    proc, _ = _run(fresh, "carry", script=SCRIPT_3D, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (carried / "eval").iterdir()) == ["paper_findings_3d_tune.json"]
    proc, calls = _run(third, "tune", script=SCRIPT_3D, env_extra=env)
    assert proc.returncode == 0 and not calls
    tuned = third / "work" / "results" / "paper_findings_3d_tune.json"
    assert tuned.read_bytes() == (carried / "eval" / tuned.name).read_bytes()
    proc, calls = _run(third, "train", seeds="0", script=SCRIPT_3D, env_extra=env)
    proc, calls = _run(third, "confirm", seeds="0", script=SCRIPT_3D, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1 and _flag(calls[0], "--tuning-result") == str(tuned) and "--resume" not in calls[0]


def test_paper_findings_3d_confirmation_refuses_missing_runs(tmp_path):
    proc, calls = _run(tmp_path, "confirm", script=SCRIPT_3D)
    assert proc.returncode != 0 and "model.pt is missing: run the train step first" in proc.stderr
    assert not calls


def test_paper_findings_3d_at_the_mmr_scale_trains_both_schemes_alike_in_the_mmr_setting(tmp_path):
    """SCALE=mmr: finding 4 in the 3D mMR study's setting (span 11, 127 x 128 x 128, 7 subsets, K = 21),
    training at the mMR study's three count levels and scoring at its two, on sets disjoint from the
    small-scanner study's, both schemes on whole images with the block-wise CNN, under a study name
    and a carried-runs folder of their own."""
    (tmp_path / "small").mkdir()
    (tmp_path / "carry").mkdir()
    small_proc, small = _run(tmp_path / "small", "simulate", script=SCRIPT_3D)
    assert small_proc.returncode == 0, small_proc.stderr
    mmr = {"SCALE": "mmr", "CARRIED": str(tmp_path / "none")}
    proc, calls = _run(tmp_path, "all", script=SCRIPT_3D, env_extra=mmr)
    assert proc.returncode == 0, proc.stderr
    sims = {Path(_flag(c, "--out")).name: c for c in calls if c[0] == "simulate"}
    trains = [c for c in calls if c[0] == "train"]
    tune, confirm = [c for c in calls if c[0] == "evaluate"]
    assert list(sims) == ["train", "tune", "confirm"]
    assert not {_flag(c, "--seed") for c in sims.values()} & {_flag(c, "--seed") for c in small}
    for c in sims.values():
        assert (_flag(c, "--scanner"), _flag(c, "--span"), _flag(c, "--image-shape")) == ("Siemens_mMR", "11", "127,128,128")
        assert (_flag(c, "--num-subsets"), _flag(c, "--num-stages"), _flag(c, "--phantom")) == ("7", "21", "mixed")
    assert _flag(sims["train"], "--counts") == "1e6,3e7,3e8"
    assert _flag(sims["tune"], "--counts") == _flag(sims["confirm"], "--counts") == "3e7,3e8"
    assert {_flag(c, "--mode") for c in trains} == {"sequential", "end_to_end"} and len(trains) == 4
    assert all(_flag(c, "--block-size") == "32,64,64" and "--patch-size" not in c for c in trains)
    assert _flag(trains[0], "--beta-counts") == "log_linear"
    assert _flag(tune, "--name") == "paper_findings_mmr3d_tune" and _flag(confirm, "--name") == "paper_findings_mmr3d"
    assert _models(confirm) == {"seq", "e2e"} and _flag(confirm, "--tune-data").endswith("tune")
    # the carried runs default to a folder of the mMR study's own
    proc, _ = _run(tmp_path / "carry", "carry", script=SCRIPT_3D, env_extra={"SCALE": "mmr"})
    assert proc.returncode == 0 and "carried_runs/paper_findings_mmr3d" in proc.stdout
    proc, calls = _run(tmp_path, "all", script=SCRIPT_3D, env_extra={"SCALE": "mMR"})
    assert proc.returncode == 2 and "SCALE must be small or mmr" in proc.stderr and not calls


def test_mmr_3d_script_evaluates_a_given_model_on_disjoint_sets_at_two_count_levels(tmp_path):
    script = REPO / "pipelines" / "mmr_3d.sh"
    proc, calls = _run(tmp_path, "all", script=script)
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == ["simulate"] * 3 + ["train", "evaluate"]
    sims = {Path(_flag(c, "--out")).name: c for c in calls[:3]}
    assert len({_flag(c, "--seed") for c in sims.values()}) == 3  # training, tuning, confirmation: disjoint
    assert _flag(sims["train"], "--counts") == "1e6,3e7,3e8"
    assert _flag(sims["tune"], "--counts") == _flag(sims["confirm"], "--counts") == "3e7,3e8"
    # the defaults are the bundled model's study: K = 63, 24 training samples, 12 epochs, a confirmation
    # seed (3002) that no choice was made on, the baselines' grids widened from the floor step's
    assert all(_flag(c, "--num-stages") == "63" and _flag(c, "--scanner") == "Siemens_mMR" for c in sims.values())
    assert (_flag(sims["train"], "--num-samples"), _flag(sims["confirm"], "--seed")) == ("24", "3002")
    assert _flag(calls[3], "--epochs") == "12"
    ev_argv = calls[4]
    assert (_flag(ev_argv, "--osem-iterations"), _flag(ev_argv, "--map-iterations")) == ("16", "16")
    assert ev_argv[ev_argv.index("--betas") + 1:ev_argv.index("--fwhm-mm")] == ["0.0003", "0.001", "0.003", "0.01",
                                                                              "0.03", "0.1"]
    # new runs: count-aware betas, training seed 0 unless TRAIN_SEED says otherwise
    assert (_flag(calls[3], "--beta-counts"), _flag(calls[3], "--seed")) == ("log_linear", "0")
    _, again = _run(tmp_path, "train", script=script, env_extra={"TRAIN_SEED": "2", "BETA_COUNTS": "none"})
    assert (_flag(again[0], "--beta-counts"), _flag(again[0], "--seed")) == ("none", "2")
    ev = calls[-1]
    assert _flag(ev, "--data").endswith("confirm") and _flag(ev, "--tune-data").endswith("tune")
    assert _flag(ev, "--model") == f"FBSEM sequential={tmp_path / 'work' / 'run' / 'model.pt'}"
    # the evaluation sets alone, and the bundled model scored in place of a trained one
    proc, calls = _run(tmp_path, "simulate_eval", script=script)
    assert proc.returncode == 0, proc.stderr
    assert [Path(_flag(c, "--out")).name for c in calls] == ["tune", "confirm"]
    bundled = str(REPO / "test_data" / "fbsem_mmr_model.pt")
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra={"MODEL": bundled})
    assert proc.returncode == 0, proc.stderr
    assert [_flag(c, "--model") for c in calls] == [f"FBSEM sequential={bundled}"] and "--resume" not in calls[0]
    (tmp_path / "work" / "eval" / "mmr_3d.partial").mkdir(parents=True)  # a stopped evaluation continues
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra={"MODEL": bundled})
    assert proc.returncode == 0 and "--resume" in calls[0]


def test_mmr_3d_scores_several_training_seeds_together_and_refuses_a_missing_model(tmp_path):
    """``MODELS="A B C" mmr_3d.sh WORK evaluate``: one ``--model`` per file, all under the same name
    (evaluate's seed group: mean and spread over the seeds); a missing file is refused, naming it,
    before evaluate starts."""
    script = REPO / "pipelines" / "mmr_3d.sh"
    models = [tmp_path / f"seed{k}.pt" for k in range(3)]
    for m in models:
        m.write_bytes(b"model")
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra={"MODELS": " ".join(map(str, models))})
    assert proc.returncode == 0, proc.stderr
    (ev,) = calls
    given = [ev[i + 1] for i, a in enumerate(ev) if a == "--model"]
    assert given == [f"FBSEM sequential={m}" for m in models]
    models[1].unlink()
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra={"MODELS": " ".join(map(str, models))})
    assert proc.returncode != 0 and calls == [] and f"model {models[1]} is missing" in proc.stderr


def test_mmr_3d_floor_step_works_on_the_tuning_phantoms_alone(tmp_path):
    """pipelines/mmr_3d.sh floor: K is chosen on the tuning set (seed 2001, the evaluation's count
    levels) with FLOOR_STAGES noise-free targets, no model and no confirmation set; a stopped
    evaluation resumes."""
    script = REPO / "pipelines" / "mmr_3d.sh"
    proc, calls = _run(tmp_path, "floor", script=script, env_extra={"FLOOR_STAGES": "63", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == ["simulate", "evaluate"]
    sim, ev = calls
    assert (_flag(sim, "--seed"), _flag(sim, "--num-stages"), _flag(sim, "--counts")) == ("2001", "63", "3e7,3e8")
    assert _flag(ev, "--data") == _flag(sim, "--out") and "--tune-data" not in ev and "--model" not in ev
    assert _flag(ev, "--name") == "floor_k63" and "--resume" not in ev
    report = json.loads((tmp_path / "work" / "eval" / "targets_floor_k63.json").read_text())  # the K needed
    assert report["levels"][0]["stages_needed"]["1"] == 3
    (tmp_path / "work" / "eval" / "floor_k63.partial").mkdir(parents=True)
    proc, calls = _run(tmp_path, "floor", script=script, env_extra={"FLOOR_STAGES": "63", "PYTHON": sys.executable})
    assert proc.returncode == 0 and "--resume" in calls[-1]


def test_gpu_mmr3d_script_trains_k63_on_the_gpu_and_confirms_on_a_fresh_seed(tmp_path, monkeypatch):
    """pipelines/gpu_mmr3d.sh: K = 63 (chosen on the tuning set), samples held on the GPU, MNI152 templates from the carried file,
    a resumable run in OUT/run, tuning seed 2001, a confirmation seed (3003) that scored neither the K = 21 model (3001)
    nor the CPU-trained K = 63 models (3002)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the parser checks --device cuda
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    script = REPO / "pipelines" / "gpu_mmr3d.sh"
    templates = tmp_path / "mni152.npz"
    env = {"WORK": str(tmp_path / "scratch"), "PYTHON": sys.executable, "MNI152_TEMPLATES": str(templates)}
    proc, calls = _run(tmp_path, "train", script=script, env_extra=env)
    assert proc.returncode == 2 and "MNI152 templates" in proc.stderr and not calls  # refused before any work
    templates.write_bytes(b"")
    out = tmp_path / "work"
    proc, calls = _run(tmp_path, "train", script=script, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == ["simulate", "train"]
    sim, tr = calls
    assert (_flag(sim, "--seed"), _flag(sim, "--num-stages"), _flag(sim, "--device")) == ("1001", "63", "cuda")
    assert _flag(sim, "--mni152-templates") == str(templates) and _flag(sim, "--phantom") == "mixed"
    assert _flag(sim, "--out") == str(tmp_path / "scratch" / "train")
    assert (_flag(tr, "--preload"), _flag(tr, "--device"), _flag(tr, "--out")) == ("device", "cuda", str(out / "run"))
    assert "--patch-size" in tr and "--resume" not in tr
    (out / "run" / "checkpoints").mkdir()
    proc, calls = _run(tmp_path, "train", script=script, env_extra=env)
    assert proc.returncode == 0 and "--resume" in calls[-1]  # a second call continues the run
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert [c[0] for c in calls] == ["simulate", "simulate", "evaluate"]
    seeds = {Path(_flag(c, "--out")).name: _flag(c, "--seed") for c in calls[:2]}
    assert seeds == {"tune": "2001", "confirm": "3003"}
    ev = calls[-1]
    assert _flag(ev, "--model") == f"FBSEM sequential={out / 'run' / 'model.pt'}" and _flag(ev, "--out") == str(out / "eval")
    assert _flag(ev, "--osem-iterations") == _flag(ev, "--map-iterations") == "16"
    betas = ev[ev.index("--betas") + 1:ev.index("--fwhm-mm")]
    assert betas[0] == "0.0003" and betas[-1] == "0.1" and _flag(ev, "--device") == "cuda"


def test_findings_verdicts_follow_the_rules_fixed_before_scoring(monkeypatch):
    t = _pipeline_module("paper_findings_table", monkeypatch)
    m = t.EQUIVALENCE_MARGIN
    # a direction claim (a below b): the whole interval below 1, above 1, or straddling it
    assert t.judge(0.90, 0.98, "a<b") == "reproduced"
    assert t.judge(1.01, 1.10, "a<b") == "not reproduced"
    assert t.judge(0.95, 1.02, "a<b") == "inconclusive"
    # higher is better (SSIM): "a better" means a ratio above 1
    assert t.judge(1.01, 1.05, "a<b", lower_is_better=False) == "reproduced"
    assert t.judge(0.90, 0.99, "a<b", lower_is_better=False) == "not reproduced"
    # equivalence ("does not notably hurt"): inside 1 +- margin, clear of it, or neither
    assert t.judge(1 - m / 2, 1 + m / 2, "a=b") == "reproduced"
    assert t.judge(1 + 1.5 * m, 1 + 3 * m, "a=b") == "not reproduced"
    assert t.judge(1 - m / 2, 1 + 2 * m, "a=b") == "inconclusive"


def test_findings_table_is_rebuilt_from_the_recorded_confirmation_runs(tmp_path, monkeypatch):
    """pipelines/results/paper_findings_2d.json follows from the recorded evaluate runs it names: the
    same rows and verdicts, the K = 12 runs' and the 60-phantom end-to-end run's (finding 3 with more data)."""
    t = _pipeline_module("paper_findings_table", monkeypatch)
    recorded = json.loads((REPO / "pipelines" / "results" / "paper_findings_2d.json").read_text())
    sources = recorded["sources"]
    assert set(sources) == {"proc", "mni", "memory", "n60"}
    argv = [a for key in ("proc", "mni", "memory", "n60") for a in (f"--{key}", str(REPO / sources[key]))]
    assert t.main([*argv, "--out", str(tmp_path / "table")]) == 0
    rebuilt = json.loads((tmp_path / "table.json").read_text())
    assert rebuilt["findings"] == recorded["findings"] and rebuilt["memory_measured"] == recorded["memory_measured"]
    more = [r for r in rebuilt["findings"] if "60 training phantoms" in r["setting"]]
    assert [(r["a"], r["b"], r["metric"]) for r in more] == [("e2e_n60", "e2e_shared_n60", "nrmse"),
                                                            ("e2e_n60", "e2e_shared_n60", "ssim")]
    assert all(r["verdict"] == t.judge(r["low"], r["high"], "a<b", r["metric"] != "ssim") for r in more)


def _evaluate_json(seed: int, net: str, net_nrmse: list[float], base_shift: float = 0.0,
                   more_nets: dict[str, list[float]] | None = None) -> dict:
    """A minimal ``evaluate`` JSON: three baselines and one learned method (2 seeds), or more
    (``more_nets``), on 4 phantoms."""
    def rows(values):
        return [{"index": i, "nrmse": v, "ssim": 1.0 - v, "nrmse_seed_std": v / 100} for i, v in enumerate(values)]

    base = [0.30, 0.32, 0.28, 0.31]
    methods = {m: {"per_sample": rows([b * f * (1 + base_shift) for b in base]),
                   "mean": {"nrmse": 0.3 * f, "ssim": 0.7}} for m, f in (("osem", 1.2), ("osem_filtered", 1.0),
                                                                          ("map_em", 1.05), ("map_em_bowsher", 0.9))}
    spread = {m: {"num_seeds": 2, "mean": 0.25, "std": 0.01} for m in ("nrmse", "ssim")}
    for name, values in {net: net_nrmse, **(more_nets or {})}.items():
        methods[name] = {"per_sample": rows(values), "seeds": {}, "spread_over_seeds": spread}
    return {"count_levels": {"2e+05": {"sample_indices": [0, 1, 2, 3], "methods": methods}},
            "phantom_sets": {"scored": {"seeds": [seed]}, "confirmation": True}}


def test_3d_finding_4_table_applies_the_fixed_rules_to_the_confirmation_run(tmp_path, monkeypatch):
    t = _pipeline_module("paper_findings_3d_table", monkeypatch)
    result = _evaluate_json(3200, "seq", [0.20, 0.22, 0.19, 0.21], more_nets={"e2e": [0.21, 0.22, 0.20, 0.21]})
    ci = lambda est, low, high, verdict="inconclusive": {"estimate": est, "low": low, "high": high, "verdict": verdict}
    result["summary"] = {"2e+05": {
        "learned_intervals": {"seq/e2e": {"nrmse": ci(0.98, 0.96, 1.01), "ssim": ci(1.03, 0.99, 1.07)}},
        "ratio_intervals": {f"{n}/{b}": {"nrmse": ci(0.9, 0.85, 0.95, "better")}
                            for n in ("seq", "e2e") for b in ("osem_filtered", "map_em")}}}
    path = tmp_path / "paper_findings_3d.json"
    path.write_text(json.dumps(result))
    assert t.main(["--confirm", str(path), "--out", str(tmp_path / "table")]) == 0
    table = json.loads((tmp_path / "table.json").read_text())["findings"]
    finding4 = [(r["a"], r["b"], r["metric"], r["verdict"]) for r in table if r["finding"].startswith("4")]
    # NRMSE inside 1 +- 0.05: reproduced; SSIM's interval crosses 1.05: inconclusive
    assert finding4 == [("seq", "e2e", "nrmse", "reproduced"), ("seq", "e2e", "ssim", "inconclusive")]
    assert {(r["a"], r["b"], r["verdict"]) for r in table if r["finding"] == "against baselines"} == {
        (n, b, "better") for n in ("seq", "e2e") for b in ("osem_filtered", "map_em")}
    assert (tmp_path / "table.png").stat().st_size > 0
    # a run scored without a tuning set is no confirmation run: refused
    result["phantom_sets"]["confirmation"] = False
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit):
        t.main(["--confirm", str(path), "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused.json").exists()


def test_3d_finding_4_table_at_the_mmr_scale_gives_every_count_level_its_rows(tmp_path, monkeypatch):
    """SCALE=mmr scores two count levels (3e7 and 3e8): each gets finding 4's rows and the baselines' rows,
    read from its own level of the JSON and named by its counts; the figure has one panel per level."""
    t = _pipeline_module("paper_findings_3d_table", monkeypatch)
    result = _evaluate_json(3300, "seq", [0.20, 0.22, 0.19, 0.21], more_nets={"e2e": [0.21, 0.22, 0.20, 0.21]})
    (level,) = result["count_levels"].values()
    result["count_levels"] = {"3e+07": level, "3e+08": level}
    ci = lambda est, low, high, verdict="inconclusive": {"estimate": est, "low": low, "high": high, "verdict": verdict}
    result["summary"] = {key: {
        "learned_intervals": {"seq/e2e": {"nrmse": ci(est, est - 0.01, est + 0.01), "ssim": ci(1.0, 0.99, 1.01)}},
        "ratio_intervals": {f"{n}/{b}": {"nrmse": ci(0.9, 0.85, 0.95, "better")}
                            for n in ("seq", "e2e") for b in ("osem_filtered", "map_em")}}
        for key, est in (("3e+07", 0.98), ("3e+08", 1.10))}
    path = tmp_path / "paper_findings_mmr3d.json"
    path.write_text(json.dumps(result))
    assert t.main(["--scale", "mmr", "--confirm", str(path), "--out", str(tmp_path / "table")]) == 0
    out = json.loads((tmp_path / "table.json").read_text())
    assert out["setting"].startswith("3D Siemens mMR span 11") and "3e7 and 3e8 prompts" in out["setting"]
    finding4 = [(r["setting"].split(", ")[1], r["metric"], r["verdict"]) for r in out["findings"]
                if r["finding"].startswith("4")]
    # 3e7: ratio 0.98 [0.97, 0.99] inside 1 +- 0.05; 3e8: 1.10 [1.09, 1.11] clear of it
    assert finding4 == [("3e7 prompts", "nrmse", "reproduced"), ("3e7 prompts", "ssim", "reproduced"),
                        ("3e8 prompts", "nrmse", "not reproduced"), ("3e8 prompts", "ssim", "reproduced")]
    assert sum(r["finding"] == "against baselines" for r in out["findings"]) == 8
    with pytest.raises(KeyError, match="3e\\+09"):
        t.at_level(result, "3e+09")
    assert (tmp_path / "table.png").stat().st_size > 0


def test_3d_finding_4_table_is_rebuilt_from_the_recorded_confirmation_run(tmp_path, monkeypatch):
    """pipelines/results/paper_findings_3d.json follows from the recorded evaluate run it names, and that
    run scored the confirmation phantoms (seed 3200) of paper_findings_3d.sh once, with the baselines tuned
    on the tuning phantoms (seed 2200), both disjoint from the training phantoms (seed 1200) of all six
    runs (two schemes x three training seeds); no baseline's choice sits at its grid's edge."""
    t = _pipeline_module("paper_findings_3d_table", monkeypatch)
    recorded = json.loads((REPO / "pipelines" / "results" / "paper_findings_3d.json").read_text())
    confirm = REPO / recorded["sources"]["confirm"]
    assert t.main(["--confirm", str(confirm), "--out", str(tmp_path / "table")]) == 0
    assert json.loads((tmp_path / "table.json").read_text())["findings"] == recorded["findings"]
    run = json.loads(confirm.read_text())
    sets = run["phantom_sets"]
    assert sets["confirmation"] and sets["disjoint_by_seed"]
    assert (sets["scored"]["seeds"], sets["tuning"]["seeds"]) == ([3200], [2200])
    assert sorted(s["role"] for s in sets["training"]) == sorted(f"training of {n}@{i}" for n in ("seq", "e2e")
                                                                for i in (1, 2, 3))
    assert all(s["seeds"] == [1200] for s in sets["training"])
    (level,) = run["count_levels"].values()
    for base in ("osem", "osem_filtered", "map_em"):
        assert level["methods"][base]["hyperparameters"]["at_grid_edge"] == [], base
    assert all(level["methods"][n]["spread_over_seeds"]["nrmse"]["num_seeds"] == 3 for n in ("seq", "e2e"))


def test_k36_domain_table_pairs_runs_on_the_same_phantoms_only(tmp_path, monkeypatch):
    import pytest

    mod = _pipeline_module("paper_findings_k36_domains", monkeypatch)
    own = [0.25, 0.27, 0.24, 0.26]
    files = {"proc-on-proc": _evaluate_json(3100, "seq_osem_k36", own),
             "mni-on-proc": _evaluate_json(3100, "seq_osem_mni_k36", [v * 1.1 for v in own]),
             "mni-on-mni": _evaluate_json(3101, "seq_osem_mni_k36", own),
             "proc-on-mni": _evaluate_json(3101, "seq_osem_k36", [v * 0.9 for v in own])}
    argv = []
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        argv += [f"--{name}", str(tmp_path / f"{name}.json")]
    out = tmp_path / "t.json"
    assert mod.main([*argv, "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0  # the figure of NRMSE per seed
    proc, mni = json.loads(out.read_text())["tables"]
    r = proc["ratios"]["trained on MNI152 / trained on procedural: nrmse"]
    assert r["estimate"] == pytest.approx(1.1) and r["verdict"] == "worse"  # every phantom 10 % worse
    r = mni["ratios"]["trained on procedural / trained on MNI152: nrmse"]
    assert r["estimate"] == pytest.approx(0.9) and r["verdict"] == "better"
    f = mni["ratios"]["trained on procedural / osem_filtered: nrmse"]
    assert f["estimate"] == pytest.approx(0.9 * sum(own) / sum([0.30, 0.32, 0.28, 0.31]))
    assert json.loads(out.read_text())["findings"] == []
    # findings 1 and 2 with the fixed-target runs: iteration-dependent targets 5 % better on MNI152,
    # 20 % worse on procedural phantoms (and so 20 % more spread over seeds there: nrmse_seed_std = nrmse / 100)
    truth = {"truth-mni-on-mni": _evaluate_json(3101, "seq_truth_mni_k36", [v / 0.95 for v in own]),
             "truth-mni-on-proc": _evaluate_json(3100, "seq_truth_mni_k36", [v * 1.1 / 1.2 for v in own])}
    for name, content in truth.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    extra = [a for name in truth for a in (f"--{name}", str(tmp_path / f"{name}.json"))]
    assert mod.main([*argv, *extra, "--out", str(out)]) == 0
    consistency, general, in_domain = json.loads(out.read_text())["findings"]
    assert consistency["metric"] == "nrmse_seed_std" and consistency["estimate"] == pytest.approx(0.95)
    assert consistency["verdict"] == in_domain["verdict"] == "reproduced"
    assert general["estimate"] == pytest.approx(1.2) and general["verdict"] == "not reproduced"
    # the procedural training set's fixed targets (findings 1 and 2 the other way round) and the
    # end-to-end run with two networks (findings 3 and 4, paired within and across runs)
    more = {"truth-proc-on-proc": _evaluate_json(3100, "seq_truth_k36", [v / 0.9 for v in own]),
            "truth-proc-on-mni": _evaluate_json(3101, "seq_truth_k36", [v * 0.9 for v in own]),
            "e2e-proc": _evaluate_json(3100, "e2e_k36", [v * 1.02 for v in own],
                                       more_nets={"e2e_shared_k36": [v * 1.02 / 0.97 for v in own]})}
    for name, content in more.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    extra += [a for name in more for a in (f"--{name}", str(tmp_path / f"{name}.json"))]
    assert mod.main([*argv, *extra, "--out", str(out)]) == 0
    findings = json.loads(out.read_text())["findings"]
    assert [(f["finding"], f["metric"]) for f in findings[3:]] == [
        ("1 consistency", "nrmse_seed_std"), ("2 generalisation", "nrmse"), ("2 (in-domain, for reference)", "nrmse"),
        ("3 iteration-dependent vs shared", "nrmse"), ("3 iteration-dependent vs shared", "ssim"),
        ("4 sequential vs end-to-end", "nrmse"), ("4 sequential vs end-to-end", "ssim")]
    c1, g2, d2, n3, s3, n4, s4 = findings[3:]
    assert c1["estimate"] == pytest.approx(0.9) and c1["verdict"] == "reproduced"
    assert g2["estimate"] == pytest.approx(0.9 / 0.9) and g2["verdict"] == "inconclusive"  # equal on every phantom
    assert (n3["a"], n3["b"], n3["estimate"], n3["verdict"]) == ("e2e_k36", "e2e_shared_k36", pytest.approx(0.97),
                                                                  "reproduced")
    assert (n4["a"], n4["b"], n4["expected"]) == ("seq_osem_k36", "e2e_k36", "a=b")
    assert n4["estimate"] == pytest.approx(1 / 1.02) and n4["verdict"] == "reproduced"  # inside 1 +- 0.05
    assert s3["metric"] == s4["metric"] == "ssim" and d2["estimate"] == pytest.approx(0.9)
    with pytest.raises(SystemExit):  # one of a pair alone
        mod.main([*argv, "--truth-proc-on-proc", str(tmp_path / "truth-proc-on-proc.json"), "--out", str(out)])
    # greedy training and the block-wise regulariser, against sequential and end-to-end
    schemes = tmp_path / "schemes-proc.json"
    schemes.write_text(json.dumps(_evaluate_json(3100, "greedy_k36", [v * 1.1 for v in own],
                                                 more_nets={"seq_block_k36": [v * 1.01 for v in own]})))
    assert mod.main([*argv, *extra, "--schemes-proc", str(schemes), "--out", str(out)]) == 0
    greedy_seq, greedy_e2e, block = json.loads(out.read_text())["findings"][-3:]
    assert (greedy_seq["a"], greedy_seq["b"], greedy_seq["estimate"]) == ("seq_osem_k36", "greedy_k36",
                                                                          pytest.approx(1 / 1.1))
    assert greedy_seq["verdict"] == "not reproduced"  # 9 % apart: outside the 5 % band
    assert (greedy_e2e["a"], greedy_e2e["estimate"]) == ("e2e_k36", pytest.approx(1.02 / 1.1))
    assert (block["b"], block["estimate"], block["verdict"]) == ("seq_block_k36", pytest.approx(1 / 1.01), "reproduced")
    e2e_args = extra[extra.index("--e2e-proc"):extra.index("--e2e-proc") + 2]
    with pytest.raises(SystemExit):  # greedy is also compared with end-to-end: --e2e-proc is needed
        mod.main([*argv, *[a for a in extra if a not in e2e_args], "--schemes-proc", str(schemes), "--out", str(out)])
    # the end-to-end run on other data than the sequential run: no pairing for finding 4
    (tmp_path / "e2e-proc.json").write_text(json.dumps(_evaluate_json(3100, "e2e_k36", own, base_shift=1e-3,
                                                                      more_nets={"e2e_shared_k36": own})))
    with pytest.raises(ValueError, match=r"e2e-proc.json\): the baselines differ"):
        mod.main([*argv, *extra, "--out", str(out)])
    # other data under one set (baselines that differ) or another phantom set: no pairing
    files["mni-on-proc"] = _evaluate_json(3100, "seq_osem_mni_k36", own, base_shift=1e-3)
    (tmp_path / "mni-on-proc.json").write_text(json.dumps(files["mni-on-proc"]))
    with pytest.raises(ValueError, match=r"procedural confirmation set \(.*mni-on-proc.json\): the baselines differ"):
        mod.main([*argv, "--out", str(out)])
    files["mni-on-proc"] = _evaluate_json(3999, "seq_osem_mni_k36", own)
    (tmp_path / "mni-on-proc.json").write_text(json.dumps(files["mni-on-proc"]))
    with pytest.raises(ValueError, match="different phantom sets"):
        mod.main([*argv, "--out", str(out)])


def test_k36_pm_mni_findings_pair_runs_and_refuse_a_run_without_its_partner(tmp_path, monkeypatch, capsys):
    """Findings 1 to 4 with the MR image and findings 3 and 4 on the MNI152 training set: each
    comparison pairs its runs phantom by phantom, takes its verdict by the rules, and the networks are
    set against the tuned baselines of their own run (MR-guided MAP-EM for PET+MR)."""
    import pytest

    mod = _pipeline_module("paper_findings_k36_pm_mni", monkeypatch)
    own = [0.25, 0.27, 0.24, 0.26]
    files = {"pm-proc": _evaluate_json(3100, "seq_osem_pm_k36", own),
             "truth-pm-proc": _evaluate_json(3100, "seq_truth_pm_k36", [v / 0.9 for v in own]),
             "e2e-pm-proc": _evaluate_json(3100, "e2e_pm_k36", [v * 1.02 for v in own],
                                           more_nets={"e2e_shared_pm_k36": [v * 1.02 / 0.97 for v in own]}),
             "mni-on-mni": _evaluate_json(3101, "seq_osem_mni_k36", own),
             "e2e-mni": _evaluate_json(3101, "e2e_mni_k36", [v * 1.1 for v in own],
                                       more_nets={"e2e_shared_mni_k36": [v * 1.1 / 1.03 for v in own]}),
             "pm-on-mni": _evaluate_json(3101, "seq_osem_pm_k36", own,
                                         more_nets={"seq_truth_pm_k36": [v * 1.25 for v in own]})}

    def argv(which):
        out = []
        for name in which:
            (tmp_path / f"{name}.json").write_text(json.dumps(files[name]))
            out += [f"--{name}", str(tmp_path / f"{name}.json")]
        return out

    out = tmp_path / "t.json"
    assert mod.main([*argv(files), "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.read_text())
    rows = {(r["finding"], r["setting"].split(";")[0], r["metric"]): r for r in result["findings"]}
    assert len(rows) == len(result["findings"]) == 11  # without the MNI152-trained PET+MR runs: 11 of 16 rows
    P, M = "procedural confirmation", "MNI152 confirmation"
    consistency = rows[("1 consistency", P, "nrmse_seed_std")]
    assert (consistency["a"], consistency["b"]) == ("seq_osem_pm_k36", "seq_truth_pm_k36")
    assert consistency["estimate"] == pytest.approx(0.9) and consistency["verdict"] == "reproduced"
    general = rows[("2 generalisation", M, "nrmse")]
    assert general["estimate"] == pytest.approx(0.8) and general["verdict"] == "reproduced"
    assert "trained on procedural; PET+MR" in general["setting"]
    pm3, pm4 = rows[("3 iteration-dependent vs shared", P, "nrmse")], rows[("4 sequential vs end-to-end", P, "nrmse")]
    assert (pm3["a"], pm3["b"], pm3["estimate"], pm3["verdict"]) == ("e2e_pm_k36", "e2e_shared_pm_k36",
                                                                      pytest.approx(0.97), "reproduced")
    assert pm4["estimate"] == pytest.approx(1 / 1.02) and pm4["verdict"] == "reproduced"  # inside 1 +- 0.05
    m3, m4 = rows[("3 iteration-dependent vs shared", M, "nrmse")], rows[("4 sequential vs end-to-end", M, "nrmse")]
    assert (m3["a"], m3["estimate"], m3["verdict"]) == ("e2e_mni_k36", pytest.approx(1.03), "not reproduced")
    assert (m4["a"], m4["b"], m4["expected"]) == ("seq_osem_mni_k36", "e2e_mni_k36", "a=b")
    assert m4["estimate"] == pytest.approx(1 / 1.1) and m4["verdict"] == "not reproduced"  # 9 % better: outside 5 %
    assert "PET-only" in m4["setting"] and "PET+MR" in pm4["setting"]
    # against the baselines of the same run: MR-guided MAP-EM for the PET+MR networks, the PET-only ones otherwise
    against = {(r["confirmation_set"], r["a"], r["b"], r["metric"]): r for r in result["against_baselines"]}
    r = against[("procedural", "seq_osem_pm_k36", "map_em_bowsher", "nrmse")]
    assert r["estimate"] == pytest.approx(sum(own) / (0.9 * sum([0.30, 0.32, 0.28, 0.31]))) and r["verdict"] == "better"
    assert {b for (_, a, b, _) in against if a == "e2e_mni_k36"} == {"osem_filtered", "map_em"}
    assert {b for (_, a, b, _) in against if "_pm" in a} == {"map_em_bowsher"}
    # a run whose partner is missing takes part in no comparison: refused, naming the partner
    with pytest.raises(SystemExit):
        mod.main([*argv(["truth-pm-proc", "mni-on-mni", "e2e-mni"]), "--out", str(out)])
    assert "--truth-pm-proc" in capsys.readouterr().err
    # the wrong run under a flag (other networks), or a run not scored as a confirmation set
    with pytest.raises(SystemExit):
        mod.main([*argv(["mni-on-mni"]), "--e2e-mni", str(tmp_path / "pm-proc.json"), "--out", str(out)])
    assert "expected ['e2e_mni_k36', 'e2e_shared_mni_k36']" in capsys.readouterr().err
    files["e2e-mni"]["phantom_sets"]["confirmation"] = False
    with pytest.raises(SystemExit):
        mod.main([*argv(["mni-on-mni", "e2e-mni"]), "--out", str(out)])
    assert "not scored as a confirmation set" in capsys.readouterr().err
    files["e2e-mni"]["phantom_sets"]["confirmation"] = True
    # other data under one set: no pairing, whether the runs are compared with each other or not
    files["e2e-mni"] = _evaluate_json(3101, "e2e_mni_k36", own, base_shift=1e-3, more_nets={"e2e_shared_mni_k36": own})
    with pytest.raises(ValueError, match=r"e2e-mni.json\): the baselines differ"):
        mod.main([*argv(["mni-on-mni", "e2e-mni"]), "--out", str(out)])
    files["e2e-mni"] = _evaluate_json(3101, "e2e_mni_k36", own, more_nets={"e2e_shared_mni_k36": own})
    files["pm-on-mni"] = _evaluate_json(3999, "seq_osem_pm_k36", own, more_nets={"seq_truth_pm_k36": own})
    with pytest.raises(ValueError, match=r"MNI152 confirmation set \(.*pm-on-mni.json\): .*different phantom sets"):
        mod.main([*argv(["pm-on-mni", "mni-on-mni", "e2e-mni"]), "--out", str(out)])


def test_k36_pm_mni_findings_are_rebuilt_from_the_recorded_confirmation_runs(tmp_path, monkeypatch):
    """pipelines/results/paper_findings_2d_k36_pm_mni.json follows from the recorded evaluate runs it
    names: every finding row and every comparison with the baselines, with its verdict."""
    mod = _pipeline_module("paper_findings_k36_pm_mni", monkeypatch)
    recorded = json.loads((REPO / "pipelines" / "results" / "paper_findings_2d_k36_pm_mni.json").read_text())
    assert set(recorded["sources"]) == set(mod.RUNS)  # every run of the study was given
    argv = [a for flag, path in recorded["sources"].items() for a in (f"--{flag}", str(REPO / path))]
    out = tmp_path / "rebuilt.json"
    assert mod.main([*argv, "--out", str(out)]) == 0
    rebuilt = json.loads(out.read_text())
    assert rebuilt["findings"] == recorded["findings"] and rebuilt["against_baselines"] == recorded["against_baselines"]
    assert len(rebuilt["findings"]) == sum(len(c.metrics) for c in mod.COMPARISONS)  # no comparison left out


def test_targets_floor_reports_the_first_k_below_each_fraction_of_the_best_baseline(tmp_path, monkeypatch):
    """pipelines/targets_floor.py: floor(K) = 1/K against baselines of known NRMSE; the smallest K
    below f x best is the first integer above 1 / (f x best), and the best is the lowest mean."""
    import math

    t = _pipeline_module("targets_floor", monkeypatch)
    floor = [1.0 / k for k in range(1, 41)]

    def level(best: float) -> dict:
        return {"targets_nrmse_by_stage": floor,
                "methods": {"osem": {"mean": {"nrmse": best * 1.5}},
                            "osem_filtered": {"mean": {"nrmse": best}, "hyperparameters": {"iterations": 3}},
                            "truth": {"mean": {"nrmse": 0.0}}}}

    result = {"count_levels": {"3e+07": level(0.13), "3e+08": level(0.031)}, "setting": {"image": "test"}}
    src = tmp_path / "floor.json"
    src.write_text(json.dumps(result))
    assert t.main([str(src), "--out", str(tmp_path / "out" / "floor"), "--fractions", "1", "0.8"]) == 0
    got = json.loads((tmp_path / "out" / "floor.json").read_text())["levels"]
    assert [lv["best_method"] for lv in got] == ["osem_filtered", "osem_filtered"]  # not the truth row
    for lv, best in zip(got, (0.13, 0.031)):
        for f in (1.0, 0.8):
            k = lv["stages_needed"][f"{f:g}"]
            expected = math.floor(1 / (f * best)) + 1
            assert k == (expected if expected <= 40 else None)
    assert (tmp_path / "out" / "floor.png").stat().st_size > 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"count_levels": {"3e+07": {"targets_nrmse_by_stage": floor, "methods": {}}}}))
    with pytest.raises(SystemExit, match="bad.json"):
        t.main([str(bad), "--out", str(tmp_path / "x")])


CARRIED_RUNS = REPO / "pipelines" / "carried_runs"
#: the carried runs and the BETA_COUNTS and TRAIN_SEED their documented train command sets (docs/studies/mmr_3d.md)
CARRIED = [("mmr3d_k63_seed0", "none", 0), ("mmr3d_k63_counts_seed0", "log_linear", 0),
           ("mmr3d_k63_counts_seed1", "log_linear", 1), ("mmr3d_k63_counts_seed2", "log_linear", 2)]


def _carried_stages_signature(ckpts: Path) -> dict:
    """The run signature of a carried sequential run's stage checkpoints, after checking that every
    one loads with weights_only=True, that stages 1..n are there without a gap, each finished one
    with its own loss rows, which join into one history, and that they share one signature."""
    from sirf_fbsem.model.io import safe_torch_load

    stages = sorted(ckpts.glob("stage_*.pt"))
    assert stages
    assert [p.name for p in stages] == [f"stage_{k:03d}.pt" for k in range(len(stages))]
    signatures, history = set(), []
    for k, path in enumerate(stages):
        ck = safe_torch_load(path, "stage checkpoint")
        signatures.add(ck["run_signature"])
        start = ck.get("history_start", 0)
        assert start <= len(history), path.name
        history = history[:start] + list(ck["history"])
        assert {r["stage"] for r in history[start:]} <= set(range(k + 1)) and history[-1]["stage"] == k
        if k < len(stages) - 1:
            assert ck["train_state"]["complete"], f"{path.name}: a stage before the last one is unfinished"
    assert len(signatures) == 1
    assert [r["stage"] for r in history] == sorted(r["stage"] for r in history)
    return json.loads(signatures.pop())


@pytest.mark.parametrize("name, beta_counts, seed", CARRIED, ids=[c[0] for c in CARRIED])
def test_the_carried_mmr3d_run_is_whole_and_is_the_run_mmr_3d_sh_trains(tmp_path: Path, name: str, beta_counts: str,
                                                                       seed: int):
    """The K = 63 runs carried between sessions (docs/studies/mmr_3d.md, "Training record"): every
    checkpoint loads with weights_only=True; stages 1..n are there without a gap, each finished one
    with its own loss rows, which join into one history; and the run's settings are those of the
    train command that ``BETA_COUNTS=... TRAIN_SEED=... STAGES=63 TRAIN_SAMPLES=24 EPOCHS=12 mmr_3d.sh WORK
    train`` issues (``none`` for the run begun before 0.9, count-unaware), so that the documented command
    resumes it rather than being refused."""
    if not (CARRIED_RUNS / name / "checkpoints").is_dir():
        pytest.skip(f"no carried training run {name} in this checkout")
    sig = _carried_stages_signature(CARRIED_RUNS / name / "checkpoints")
    _, calls = _run(tmp_path, "train", script=REPO / "pipelines" / "mmr_3d.sh",
                    env_extra={"STAGES": "63", "TRAIN_SAMPLES": "24", "EPOCHS": "12", "BETA_COUNTS": beta_counts,
                               "TRAIN_SEED": str(seed)})
    (argv,) = calls
    cfg, net = sig["config"], sig["network"]
    assert sig["mode"] == _flag(argv, "--mode") and sig["num_samples"] == 24 and net["num_stages"] == 63
    assert cfg["epochs"] == int(_flag(argv, "--epochs")) and cfg["loss"] == _flag(argv, "--loss")
    assert cfg["seed"] == int(_flag(argv, "--seed")) == seed
    assert net.get("beta_counts", "none") == _flag(argv, "--beta-counts") == beta_counts
    assert cfg["validation_fraction"] == float(_flag(argv, "--validation-fraction"))
    assert cfg["patch_shape"] == [int(v) for v in _flag(argv, "--patch-size").split(",")]
    assert cfg["patches_per_sample"] == int(_flag(argv, "--patches-per-sample"))
    assert net["regulariser_config"]["channels"] == int(_flag(argv, "--channels"))
    assert net["regulariser_config"]["layers"] == int(_flag(argv, "--layers"))


@pytest.mark.parametrize("study, scale, image_shape", [("paper_findings_3d", "small", (15, 47, 47)),
                                                     ("paper_findings_mmr3d", "mmr", (127, 128, 128))])
def test_the_carried_3d_finding_4_runs_are_whole_and_are_the_runs_the_script_trains(tmp_path: Path, study: str,
                                                                                   scale: str, image_shape):
    """pipelines/carried_runs/paper_findings_3d (and paper_findings_mmr3d, SCALE=mmr): each carried run is
    the run paper_findings_3d.sh trains under its name (mode, seed, epochs, loss, count rule, CNN), so
    that the script resumes it or takes its model. A stopped sequential run's stage checkpoints are whole
    (as above); a stopped end-to-end run's joint checkpoint loads with weights_only=True; a finished run's
    model file loads (checksums verified) as a 21-stage model on the study's image grid."""
    from sirf_fbsem.model.io import load_model
    from sirf_fbsem.training.export import read_run_checkpoints

    root = CARRIED_RUNS / study
    carried = sorted(p for p in root.glob("*_s*") if (p / "checkpoints").is_dir() or (p / "model.pt").is_file())
    if not carried:
        pytest.skip(f"no carried run of the {study} study in this checkout")
    _, calls = _run(tmp_path, "train", seeds="0 1 2", script=SCRIPT_3D,
                    env_extra={"CARRIED": str(tmp_path / "none"), "SCALE": scale})
    commands = {Path(_flag(c, "--out")).name: c for c in calls}
    for run in carried:
        argv = commands[run.name]
        if (run / "model.pt").is_file():
            assert not (run / "checkpoints").exists(), f"{run.name}: a finished run is carried as its model alone"
            net, meta = load_model(run / "model.pt")
            cfg, netcfg, mode = meta["train_config"], meta["network"], meta["training_mode"]
            assert net.num_stages == 21 and meta["image_geometry"].shape == image_shape
        else:
            sig = (_carried_stages_signature(run / "checkpoints") if _flag(argv, "--mode") == "sequential"
                   else read_run_checkpoints(run).signature)  # the joint checkpoint, loaded weights-only
            cfg, netcfg, mode = sig["config"], sig["network"], sig["mode"]
        assert mode == _flag(argv, "--mode")
        assert netcfg["num_stages"] == 21, run.name
        assert cfg["seed"] == int(_flag(argv, "--seed")) and cfg["epochs"] == int(_flag(argv, "--epochs"))
        assert cfg["loss"] == _flag(argv, "--loss") and netcfg.get("beta_counts", "none") == _flag(argv, "--beta-counts")
        assert netcfg["regulariser_config"]["channels"] == int(_flag(argv, "--channels"))
        assert netcfg["regulariser_config"]["layers"] == int(_flag(argv, "--layers"))


#: the carried K = 63 runs of the count-aware model, one per training seed (seed 0's model is the bundled one)
CARRIED_SEEDS = ["mmr3d_k63_counts_seed0", "mmr3d_k63_counts_seed1", "mmr3d_k63_counts_seed2"]
BUNDLED_MMR_MODEL = REPO / "test_data" / "fbsem_mmr_model.pt"


@pytest.mark.parametrize("name", CARRIED_SEEDS)
def test_a_finished_carried_runs_model_is_exported_from_its_checkpoints_alone(tmp_path: Path, name: str):
    """``export-model`` writes a finished carried run's model on a host without its training set
    (the carried checkpoints and training-set manifest, as ``mmr_3d.sh export`` does): stage by stage
    the weights its checkpoints kept (strength, count slope and CNN); and for training seed 0 the
    bundled model exactly, weights and metadata (all but the data's path and the export record):
    the model written from the carried run is the one ``train`` wrote."""
    from sirf_fbsem.model.io import load_model, safe_torch_load
    from sirf_fbsem.training.export import export_model, read_run_checkpoints

    run = CARRIED_RUNS / name
    if not (run / "checkpoints").is_dir() or not (run / "train" / "manifest.json").is_file():
        pytest.skip(f"no carried run {name} with its training set's manifest in this checkout")
    carried = read_run_checkpoints(run)
    if carried.finished_stages < carried.num_stages:
        pytest.skip(f"{name}: {carried.finished_stages} of {carried.num_stages} stages trained so far")
    net, meta = load_model(export_model(run, [run / "train"], tmp_path / "model.pt"))
    ckpts = sorted((run / "checkpoints").glob("stage_*.pt"))
    assert len(ckpts) == net.num_stages == 63
    for k, path in enumerate(ckpts):
        kept, scored = safe_torch_load(path, "stage checkpoint")["stage_state"], net.stages[k].state_dict()
        assert kept.keys() == scored.keys(), path.name
        for key in kept:
            assert torch.equal(kept[key].cpu(), scored[key]), f"{path.name}: {key} differs from the exported model's"
    assert meta["exported_from"] == {"run": str(run), "stages": 63, "run_stages": 63}
    if name.endswith("seed0"):
        ref_net, ref_meta = load_model(BUNDLED_MMR_MODEL)
        ref = ref_net.state_dict()
        assert ref.keys() == net.state_dict().keys()
        assert all(torch.equal(ref[k], v) for k, v in net.state_dict().items())
        drop = {"data", "exported_from", "sirf_fbsem_version"}
        assert {k: v for k, v in meta.items() if k not in drop} == {k: v for k, v in ref_meta.items() if k not in drop}


def test_mmr_3d_carries_a_run_between_sessions(tmp_path: Path):
    """``CARRIED=DIR mmr_3d.sh WORK train`` starts from DIR's checkpoints when WORK's run has none
    (and resumes), leaves a run that has its own alone; ``carry`` copies the run's checkpoints back,
    with the training set's manifest and without the model file."""
    script = REPO / "pipelines" / "mmr_3d.sh"
    carried = tmp_path / "carried"
    (carried / "checkpoints").mkdir(parents=True)
    (carried / "checkpoints" / "stage_000.pt").write_bytes(b"carried")
    env = {"CARRIED": str(carried)}
    run = tmp_path / "work" / "run" / "checkpoints"
    proc, calls = _run(tmp_path, "train", script=script, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert "--resume" in calls[0] and (run / "stage_000.pt").read_bytes() == b"carried"

    (run / "stage_000.pt").write_bytes(b"newer")
    (run / "stage_001.pt").write_bytes(b"new stage")
    proc, calls = _run(tmp_path, "train", script=script, env_extra=env)
    assert "--resume" in calls[0] and (run / "stage_000.pt").read_bytes() == b"newer"  # the run's own kept
    (run.parent / "model.pt").unlink()  # the stand-in's train wrote one; this run has not finished
    (tmp_path / "work" / "train").mkdir(parents=True)
    (tmp_path / "work" / "train" / "manifest.json").write_text('{"seed": 1001}')
    proc, calls = _run(tmp_path, "carry", script=script, env_extra=env)
    assert proc.returncode == 0 and calls == [], proc.stderr
    assert sorted(p.name for p in (carried / "checkpoints").iterdir()) == ["stage_000.pt", "stage_001.pt"]
    assert (carried / "checkpoints" / "stage_000.pt").read_bytes() == b"newer"
    # the training set's manifest goes with the run (export reads it); the model file never does
    assert (carried / "train" / "manifest.json").read_text() == '{"seed": 1001}'
    (run.parent / "model.pt").write_bytes(b"finished model")
    proc, _ = _run(tmp_path, "carry", script=script, env_extra=env)
    assert proc.returncode == 0 and not (carried / "model.pt").exists(), proc.stderr

    proc, _ = _run(tmp_path, "carry", script=script)  # no CARRIED: refused, naming it
    assert proc.returncode != 0 and "CARRIED" in proc.stderr


def test_mmr_3d_export_writes_a_carried_runs_model_on_a_host_without_the_training_set(tmp_path: Path):
    """``CARRIED=DIR mmr_3d.sh WORK export``: on a host with neither the run nor the training set,
    ``export-model`` reads DIR's checkpoints and DIR/train's manifest and writes $RUN/model.pt; with
    the run and the training set on the host it reads those; an existing model file is left alone
    (train wrote it), with no command issued."""
    script = REPO / "pipelines" / "mmr_3d.sh"
    carried = tmp_path / "carried"
    env = {"CARRIED": str(carried), "RUN": str(tmp_path / "work" / "run_s1")}
    proc, calls = _run(tmp_path, "export", script=script, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    (ex,) = calls
    assert ex[0] == "export-model" and _flag(ex, "--run") == str(carried)
    assert _flag(ex, "--data") == str(carried / "train")
    assert _flag(ex, "--output") == str(tmp_path / "work" / "run_s1" / "model.pt")
    assert (tmp_path / "work" / "run_s1" / "model.pt").read_bytes() == b"exported"

    proc, calls = _run(tmp_path, "export", script=script, env_extra=env)
    assert proc.returncode == 0 and calls == [] and "exists" in proc.stdout
    (tmp_path / "work" / "run_s1" / "model.pt").unlink()
    (tmp_path / "work" / "run_s1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "work" / "train").mkdir(parents=True)
    (tmp_path / "work" / "train" / "manifest.json").write_text("{}")
    proc, calls = _run(tmp_path, "export", script=script, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert _flag(calls[0], "--run") == env["RUN"] and _flag(calls[0], "--data") == str(tmp_path / "work" / "train")


def test_mmr_3d_carries_a_stopped_evaluation_between_sessions(tmp_path: Path):
    """``carry`` copies a stopped evaluation's partial results (EVAL_OUT/mmr_3d.partial) into CARRIED/eval;
    ``evaluate`` with CARRIED copies them into an EVAL_OUT that has none and resumes; it copies nothing
    over a partial directory of its own nor once the evaluation has finished."""
    script = REPO / "pipelines" / "mmr_3d.sh"
    carried = tmp_path / "carried"
    env = {"CARRIED": str(carried), "MODEL": str(REPO / "test_data" / "fbsem_mmr_model.pt")}
    proc, _ = _run(tmp_path, "carry", script=script, env_extra=env)  # nothing to carry: refused, saying so
    assert proc.returncode != 0 and "mmr_3d.partial" in proc.stderr and not carried.exists()

    partial = tmp_path / "work" / "eval" / "mmr_3d.partial"
    partial.mkdir(parents=True)
    (partial / "signature.json").write_text("{}")
    (partial / "grid_3e_07_0000.npz").write_bytes(b"grid")
    proc, calls = _run(tmp_path, "carry", script=script, env_extra=env)
    assert proc.returncode == 0 and calls == [], proc.stderr
    kept = carried / "eval" / "mmr_3d.partial"
    assert sorted(p.name for p in kept.iterdir()) == ["grid_3e_07_0000.npz", "signature.json"]
    assert not (carried / "checkpoints").exists()  # no training run here

    shutil.rmtree(tmp_path / "work" / "eval")  # a new session: the host kept nothing
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert "--resume" in calls[0] and (partial / "grid_3e_07_0000.npz").read_bytes() == b"grid"

    (partial / "grid_3e_07_0000.npz").write_bytes(b"newer")  # the session's own partial results are kept
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra=env)
    assert "--resume" in calls[0] and (partial / "grid_3e_07_0000.npz").read_bytes() == b"newer"

    shutil.rmtree(partial)  # finished: evaluate removed its partial results and wrote the JSON
    (tmp_path / "work" / "eval" / "mmr_3d.json").write_text("{}")
    proc, calls = _run(tmp_path, "evaluate", script=script, env_extra=env)
    assert "--resume" not in calls[0] and not partial.exists()
