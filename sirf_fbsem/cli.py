"""Command line: ``sirf-fbsem reconstruct | simulate | train | evaluate | export-model``.

Each sub-command maps its flags one to one onto library calls; nothing here computes.
Under ``torchrun`` (``torchrun --nproc-per-node N -m sirf_fbsem train|reconstruct ...``)
``train`` trains data-parallel and ``reconstruct`` shares its inputs among the ranks.

Errors (README, "Errors and safety"): :func:`main` is the one error boundary. Every expected
failure prints one line, ``sirf-fbsem COMMAND: error: ...``, in the command line's terms (the
flags, not the library's parameter names), and exits with 2 (bad input, flag or output path:
found before any heavy work), 1 (a failure while running), 130/143 (SIGINT/SIGTERM: no partial
output is left, and a command that resumes is printed). ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Iterator, Sequence

from .errors import (
    EXIT_RUNTIME,
    EXIT_SIGINT,
    EXIT_USAGE,
    InputError,
    Interrupted,
    SirfFbsemError,
)
from .acquisition import estimated_image_geometry, input_format, load_acquisition
from .argtypes import bounded_int, finite_float, torch_device, voxel_shape
from .batch import BatchItem, expand_inputs, plan_outputs, run_batch
from .distributed import init_distributed, local_device, shutdown
from .evaluation import add_evaluate_arguments, run_evaluate
from .io import nifti
from .io.dicom import radiopharmaceutical_from_header, write_dicom_series
from .io.interfile import write_image
from .io.outputs import SERIES_MANIFEST, PlannedOutput, absolute, check_planned, check_replaceable
from .model.io import load_model
from .preview import save_montage
from .projectors.factory import add_backend_argument, check_backend
from .reconstructor import reconstruct_acquisition
from .simulation.cli import add_simulate_arguments, run_simulate
from .training.cli import add_export_arguments, add_train_arguments, run_export, run_train

__all__ = ["main", "build_parser", "MAX_ITERATIONS", "in_cli_terms"]

#: most OSEM/MLEM iterations ``reconstruct`` accepts (each is a full pass over the data)
MAX_ITERATIONS = 1000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sirf-fbsem", description="FBSEM-Net PET reconstruction for SIRF/STIR data.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reconstruct", help="reconstruct sinograms (.hs) or mMR listmode (.l.hdr)")
    r.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="Interfile sinogram .hs or listmode header .l.hdr; several inputs, @LIST.txt "
                        "(one path a line) or a quoted glob ('scans/*.hs') with --output-dir")
    r.add_argument("--output", "-o", type=Path, help="output image of a single input: .nii, .nii.gz or .hv")
    r.add_argument("--output-dir", type=Path,
                   help="batch: write DIR/<input stem><--format> for every input (outputs already there are "
                        "skipped; summary in DIR/reconstruct_summary.json; torchrun shares the inputs among ranks)")
    r.add_argument("--format", dest="output_format", choices=["nii.gz", "nii", "hv"], default=None,
                   help="batch output format (default nii.gz)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace outputs that an earlier sirf-fbsem run wrote (never files it did not write)")
    r.add_argument("--algorithm", choices=["osem", "mlem", "fbsem"], default=None,
                   help="default: fbsem when --model is given, else osem")
    r.add_argument("--model", type=Path, help="trained FBSEM model file (.pt)")
    r.add_argument("--block-size", type=voxel_shape, default=None, metavar="Z,Y,X",
                   help="FBSEM: run the model's CNNs block by block, blocks of Z,Y,X voxels: memory of one "
                        "block, same image (e.g. 32,64,64)")
    r.add_argument("--override-geometry", action="store_true",
                   help="use a model trained on another geometry (not recommended)")
    r.add_argument("--iterations", type=bounded_int(1, MAX_ITERATIONS), default=None,
                   help=f"OSEM/MLEM iterations (default 4, at most {MAX_ITERATIONS}; FBSEM: the model's stages)")
    r.add_argument("--subsets", type=bounded_int(1), default=None,
                   help="OSEM subsets (default 4; FBSEM: the model's)")
    r.add_argument("--norm", type=Path, help="normalisation: mMR .n.hdr or efficiency sinogram .hs")
    r.add_argument("--mu-map", type=Path, help="attenuation map in 1/cm (.hv or NIfTI)")
    r.add_argument("--additive", type=Path, help="randoms + scatter sinogram .hs (counts)")
    r.add_argument("--time", nargs=2, type=finite_float(0.0), metavar=("T0", "T1"),
                   help="listmode time interval, s")
    r.add_argument("--span", type=bounded_int(1), default=None, help="listmode histogramming span (1 or 11; default 11)")
    r.add_argument("--negative", choices=["zero", "error"], default="zero",
                   help="negative prompts (precorrected data): clip to 0 with a warning (default) or stop")
    r.add_argument("--psf-fwhm", type=finite_float(0.0), default=None,
                   help="image-space PSF FWHM, mm (default 0 = none; FBSEM: the model's)")
    r.add_argument("--dicom", type=Path,
                   help="also write a DICOM PET series into this new or empty directory (batch: DIR/<input stem>/)")
    r.add_argument("--preview", type=Path, help="also write a PNG montage (batch: a directory, DIR/<input stem>.png)")
    r.add_argument("--patient-position", default="HFS", choices=["HFS", "HFP", "FFS", "FFP"])
    r.add_argument("--device", type=torch_device, default="cpu", help="cpu or cuda[:N]")
    add_backend_argument(r)
    r.add_argument("--ray-tracing", choices=["joseph", "siddon", "auto"], default=None,
                   help="embedded projector: auto (default: siddon where it runs, i.e. on the CPU, else "
                        "joseph), siddon (SIRF's ray-tracing matrix row for row: SIRF's image; CPU only) or "
                        "joseph (interpolating; CPU or GPU, faster, within ~0.5%% of SIRF on smooth images); "
                        "the --mu-map is projected the same way")
    r.add_argument("--no-progress", action="store_true")

    add_simulate_arguments(sub.add_parser("simulate", help="simulate training data"))
    add_train_arguments(sub.add_parser("train", help="train FBSEM-Net"))
    add_evaluate_arguments(sub.add_parser("evaluate", help="compare OSEM, MAP-EM and FBSEM on held-out phantoms"))
    add_export_arguments(sub.add_parser("export-model", help="write a training run's model file from its checkpoints"))
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def _usage(message: str) -> InputError:
    return InputError(message)


def check_reconstruct_options(args: argparse.Namespace, inputs: Sequence[Path]) -> str:
    """Refuse flags that do not apply to the inputs or the algorithm; return the algorithm.

    Every message names the flag. Applied before anything is read beyond the inputs' names.
    """
    algorithm = args.algorithm or ("fbsem" if args.model else "osem")
    if args.output is not None and args.output_dir is not None:
        raise _usage("give --output (one input) or --output-dir (a batch), not both")
    if args.output_dir is None:
        if args.output is None:
            raise _usage("--output FILE (one input) or --output-dir DIR is required")
        if len(inputs) != 1:
            raise _usage(f"{len(inputs)} inputs need --output-dir DIR, not --output")
        if args.output_format is not None:
            raise _usage("--format applies to --output-dir (a batch); with --output the file name's ending "
                         "(.nii, .nii.gz, .hv) gives the format")
        name = args.output.name.lower()
        if not (name.endswith(".nii") or name.endswith(".nii.gz") or name.endswith(".hv")) or name in (
                ".nii", ".nii.gz", ".hv"):
            raise _usage(f"--output must be a file name ending in .nii, .nii.gz or .hv, got {str(args.output)!r}")
    if algorithm == "fbsem":
        if args.model is None:
            raise _usage("--algorithm fbsem needs --model MODEL.pt")
        if args.iterations is not None:
            raise _usage("--iterations applies to OSEM and MLEM; FBSEM runs the model's stages (one per "
                         "iteration it was trained to unroll): leave --iterations out, or use --algorithm osem")
    else:
        if args.model is not None:
            raise _usage(f"--model applies to --algorithm fbsem, not {algorithm}")
        if args.override_geometry:
            raise _usage("--override-geometry applies only with --model (FBSEM)")
        if args.block_size is not None:
            raise _usage("--block-size runs an FBSEM model's CNNs block by block: it applies only with --model")
        if algorithm == "mlem" and args.subsets not in (None, 1):
            raise _usage(f"--subsets {args.subsets}: MLEM uses one subset (use --algorithm osem for subsets)")
    if args.time is not None and not args.time[0] < args.time[1]:
        raise _usage(f"--time T0 T1 needs T0 < T1 (seconds from the start of the acquisition), got "
                     f"{args.time[0]:g} {args.time[1]:g}")
    if args.ray_tracing is not None and args.backend != "embedded":
        raise _usage(f"--ray-tracing chooses the embedded projector's ray tracing; --backend {args.backend} "
                     f"traces with STIR's own (Siddon)")
    kinds = {input_format(p) for p in inputs if Path(p).exists()}
    if "sinogram" in kinds:
        sinogram = next(p for p in inputs if Path(p).exists() and input_format(p) == "sinogram")
        if args.time is not None:
            raise _usage(f"--time applies to listmode input; {str(sinogram)!r} is a sinogram (already histogrammed)")
        if args.span is not None:
            raise _usage(f"--span applies to listmode input (it is the histogramming span); the sinogram "
                         f"{str(sinogram)!r} has its own span")
    return algorithm


def _plan_outputs_of(args: argparse.Namespace, input_path: Path, output: Path, dicom: Path | None,
                     preview: Path | None, batch: bool) -> list[PlannedOutput]:
    """The files one input writes, with their sizes estimated from its header."""
    try:
        geom = estimated_image_geometry(input_path, args.span or 11)
    except FileNotFoundError:
        geom = None  # load_acquisition names the missing file
    voxels = 0 if geom is None else int(math.prod(geom.shape))
    nz, ny, nx = (0, 0, 0) if geom is None else geom.shape
    name = output.name.lower()
    kind = "interfile_image" if name.endswith(".hv") else "nifti"
    planned = [PlannedOutput(absolute(output), kind, "--output-dir" if batch else "--output", 4 * voxels + 4096)]
    if dicom is not None:
        planned.append(PlannedOutput(absolute(dicom), "dicom_series", "--dicom", nz * (2 * ny * nx + 4096)))
    if preview is not None:
        planned.append(PlannedOutput(absolute(preview), "png", "--preview", 1 << 20))
    return planned


def run_reconstruct(args: argparse.Namespace) -> int:
    """One input with ``--output`` (as always), or a batch with ``--output-dir`` (sharded across
    torchrun ranks); returns 1 when any input of a batch failed.

    Before any input is read: the flags are checked against the inputs and the algorithm, and
    every output is checked (:mod:`sirf_fbsem.io.outputs`): writable, with room, and not a file
    sirf_fbsem did not write (an earlier output of it is replaced with ``--overwrite``; a batch
    skips inputs whose image exists).
    """
    inputs = expand_inputs(args.inputs)
    algorithm = check_reconstruct_options(args, inputs)
    check_backend(args.backend)
    fmt = args.output_format or "nii.gz"
    if args.output_dir is None:
        items = [BatchItem(inputs[0], args.output)]
        planned = _plan_outputs_of(args, inputs[0], args.output, args.dicom, args.preview, batch=False)
        check_planned(planned, args.overwrite)
        todo = items
    else:
        items = plan_outputs(inputs, args.output_dir, "." + fmt)
        summary = PlannedOutput(absolute(args.output_dir / "reconstruct_summary.json"), "json", "--output-dir",
                                1 << 16, replace_own=True)
        planned, todo = [summary], []
        for item in items:
            stem = item.output.name[: -len("." + fmt)]
            mine = _plan_outputs_of(args, item.input, item.output,
                                    None if args.dicom is None else args.dicom / stem,
                                    None if args.preview is None else args.preview / f"{stem}.png", batch=True)
            if check_replaceable(mine[0], overwrite=True) == "ours" and not args.overwrite:
                continue  # skipped by run_batch: its image exists
            planned += mine
            todo.append(item)
        check_planned(planned, args.overwrite)
    ctx = init_distributed(args.device)
    try:
        device = local_device(args.device, ctx.local_rank) if ctx.is_distributed else args.device
        progress = not args.no_progress and ctx.is_main
        if args.output_dir is None and not ctx.is_distributed:
            _reconstruct_one(args, inputs[0], args.output, args.dicom, args.preview, algorithm, device, progress)
            return 0

        def process(item: BatchItem) -> None:
            dicom, preview = args.dicom, args.preview
            if args.output_dir is not None:  # per-input places inside the given directories
                stem = item.output.name[: -len("." + fmt)]
                dicom = None if dicom is None else dicom / stem
                preview = None if preview is None else preview / f"{stem}.png"
            _reconstruct_one(args, item.input, item.output, dicom, preview, algorithm, device, progress)

        results = run_batch(
            items, process, ctx,
            summary_path=None if args.output_dir is None else args.output_dir / "reconstruct_summary.json",
            skip_existing=args.output_dir is not None and not args.overwrite,
        )
        failed = [r for r in results if r.status == "failed"]
        if ctx.is_main and args.output_dir is not None:
            counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
            print(f"reconstruct: {len(results)} inputs on {ctx.world_size} rank(s): {counts['written']} written, "
                  f"{counts['skipped']} skipped (output exists), {counts['failed']} failed; summary "
                  f"{args.output_dir / 'reconstruct_summary.json'}")
            for r in failed:
                print(f"  failed: {r.input}: {r.error}", file=sys.stderr)
        return EXIT_RUNTIME if failed else 0
    finally:
        shutdown(ctx)


def _reconstruct_one(args: argparse.Namespace, input_path: Path, output: Path, dicom: Path | None,
                     preview: Path | None, algorithm: str, device: str, progress: bool) -> None:
    """Reconstruct ``input_path`` and write ``output`` (+ DICOM series, preview), each atomically."""
    import numpy as np

    t0 = time.perf_counter()
    acq = load_acquisition(
        input_path,
        norm=args.norm,
        mu_map=args.mu_map,
        additive=args.additive,
        time_interval_s=tuple(args.time) if args.time else None,
        span=args.span or 11,
        negative=args.negative,
        progress=progress,
        backend=args.backend,
        ray_tracing=args.ray_tracing or "auto",
    )
    # an FBSEM model reconstructs on the grid it was trained on (its CNN is resolution dependent);
    # OSEM, MLEM and --override-geometry on the scanner's default image, as SIRF's create_uniform_image
    if algorithm == "fbsem" and not args.override_geometry:
        image_geom = load_model(args.model)[1]["image_geometry"]
    else:
        image_geom = acq.geometry.default_image()
    x, description = reconstruct_acquisition(
        acq,
        image_geom,
        algorithm=algorithm,
        model_path=args.model,
        override_geometry=args.override_geometry,
        block_shape=args.block_size,
        num_iterations=args.iterations or 4,
        num_subsets=args.subsets,
        psf_fwhm_mm=args.psf_fwhm,
        device=device,
        progress=progress,
        backend=args.backend,
        ray_tracing=args.ray_tracing or "auto",
    )
    image = x.detach().cpu().numpy().astype(np.float32)
    _write_outputs(args, output, dicom, preview, input_path, image, image_geom, acq, description)
    print(
        f"{description}: {image_geom.describe()} -> {output} "
        f"({time.perf_counter() - t0:.1f} s; sum {image.sum():.4g})"
    )


def _write_outputs(args: argparse.Namespace, out: Path, dicom: Path | None, preview: Path | None,
                   input_path: Path, image, image_geom, acq, description: str) -> None:
    """DICOM series and preview first, the image last: an existing image marks a finished input.

    Each file is written atomically; when one fails (or a signal arrives), the files already
    written for this input are removed (a DICOM directory only when this run created it), so a
    failed input leaves nothing behind.
    """
    written: list[Path] = []
    try:
        _write_each(args, out, dicom, preview, input_path, image, image_geom, acq, description, written)
    except BaseException:
        for path in reversed(written):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()  # only a directory this run created, now empty
            else:
                path.unlink(missing_ok=True)
        raise


def _write_each(args: argparse.Namespace, out: Path, dicom: Path | None, preview: Path | None,
                input_path: Path, image, image_geom, acq, description: str, written: list[Path]) -> None:
    if dicom:
        extra = {}
        hdr = acq.listmode_header
        info = None if hdr is None else radiopharmaceutical_from_header(hdr)
        if info is not None:
            extra["radiopharmaceutical"] = info
        created = not Path(dicom).exists()
        files = write_dicom_series(dicom, image, image_geom, acq.geometry.scanner,
                                   patient_position=args.patient_position, series_description=description,
                                   units="BQML" if acq.multiplicative is not None else "CNTS",
                                   overwrite=args.overwrite, **extra)
        if created:
            written.append(Path(dicom))
        written += files + [Path(dicom) / SERIES_MANIFEST]
    if preview:
        save_montage(preview, image, title=f"{Path(input_path).name}: {description}",
                     voxel_size_mm=image_geom.voxel_size_mm, overwrite=args.overwrite)
        written.append(Path(preview))
    name = out.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        nifti.write_nifti(out, image, image_geom, acq.geometry.scanner, patient_position=args.patient_position,
                          description=description, overwrite=args.overwrite or args.output_dir is not None)
    else:
        write_image(out, image_geom, image)


# ------------------------------------------------------------------------------ error boundary
#: the library's parameter names as each command's flags spell them (messages are shown in CLI terms)
_COMMON_TERMS: tuple[tuple[str, str], ...] = (
    (r"set_model\(\.\.\., override_geometry=True\)", "--override-geometry"),
    (r"\boverride_geometry=True\b", "--override-geometry"),
    (r"\ballow_negative=True\b", "--negative zero"),
    (r"\bresume=True \(--resume\)", "--resume"),
    (r"\bresume=False \(--no-resume\)", "--no-resume"),
    (r"\bresume=True\b", "--resume"),
    (r"\btime_interval_s\b", "--time"),
    (r"\bnum_iterations\b", "--iterations"),
    (r"\bpsf_fwhm_mm\b", "--psf-fwhm"),
    (r"\bmodel_path\b", "--model"),
)
_COMMAND_TERMS: dict[str, tuple[tuple[str, str], ...]] = {
    "reconstruct": ((r"\bnum_subsets=(\d+)", r"--subsets \1"), (r"\bnum_subsets\b", "--subsets")),
    "simulate": ((r"\bnum_subsets=(\d+)", r"--num-subsets \1"), (r"\bnum_subsets\b", "--num-subsets"),
                 (r"\bpsf_fwhm_mm\b", "--psf-fwhm-mm"), (r"\brandoms_fraction\b", "--randoms-fraction"),
                 (r"\bscatter_fraction\b", "--scatter-fraction"), (r"\bnum_samples\b", "--num-samples"),
                 (r"\bnum_stages\b", "--num-stages")),
    "evaluate": ((r"\bnum_subsets\b", "--subsets"),),
    "train": (),
}


def in_cli_terms(message: str, command: str) -> str:
    """``message`` with the library's parameter names replaced by ``command``'s flags."""
    for pattern, flag in _COMMAND_TERMS.get(command, ()) + _COMMON_TERMS:
        message = re.sub(pattern, flag, message)
    return message


# Packages whose Python code runs inside native callbacks: llvmlite calls back into Python (through
# ctypes) while numba compiles or loads a cached kernel, and ctypes drops an exception raised there
# ("Exception ignored on calling ctypes callback function") with LLVM left half-way: the process
# then dies of SIGSEGV instead of cleaning up. A signal that lands in their code is held until it
# has returned.
_UNINTERRUPTIBLE_PACKAGES = frozenset({"numba", "llvmlite"})
_RETRY_S = 0.05  # how soon a held signal is looked at again (SIGALRM), in seconds


def _in_uninterruptible_code(frame: FrameType | None) -> bool:
    """Whether any frame on the stack from ``frame`` belongs to :data:`_UNINTERRUPTIBLE_PACKAGES`."""
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if module.partition(".")[0] in _UNINTERRUPTIBLE_PACKAGES:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so that ``finally``
    blocks and the atomic writers remove what was half-written; a second signal during that
    clean-up is not caught again (SIGINT then raises ``KeyboardInterrupt``).

    A signal that arrives while numba's compiler is on the stack is held (see
    :data:`_UNINTERRUPTIBLE_PACKAGES`) and raised at the first look (every ``_RETRY_S`` seconds,
    by SIGALRM) that finds the compiler gone.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if _in_uninterruptible_code(frame):
            held[:] = [signum]
            signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
            return
        held.clear()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Interrupted(signum)

    def look_again(signum: int, frame: FrameType | None) -> None:
        if held:
            handler(held[0], frame)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGALRM, look_again)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)


def _resume_hint(args: argparse.Namespace, argv: Sequence[str]) -> str:
    command = "sirf-fbsem " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "train":
        if "--resume" not in argv:
            command += " --resume"
        return (f"the checkpoints in {str(args.out / 'checkpoints')!r} are intact (written atomically); "
                f"continue with:\n  {command}")
    if args.command == "reconstruct":
        if args.output_dir is not None:
            return (f"the images written so far are complete and kept; the same command reconstructs the rest "
                    f"(existing outputs are skipped):\n  {command}")
        return f"no output was written (nothing half-written is left); run it again with:\n  {command}"
    if args.command == "simulate":
        return f"the samples written so far are complete and kept; the same command goes on:\n  {command}"
    return f"no output was written; run it again with:\n  {command}"


def _report(command: str, message: str) -> None:
    print(f"sirf-fbsem {command}: error: {in_cli_terms(message, command)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run ``sirf-fbsem`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    command = args.command
    try:
        with _signals_interrupt():
            return _dispatch(args)
    except (Interrupted, KeyboardInterrupt) as err:
        if args.debug:
            raise
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(f"sirf-fbsem {command}: interrupted ({signal.Signals(signum).name}); {_resume_hint(args, argv)}",
              file=sys.stderr)
        return err.exit_code if isinstance(err, Interrupted) else EXIT_SIGINT
    except Exception as err:  # the one error boundary: every failure becomes one line and an exit code
        if args.debug:
            raise
        code, message = _classify(err)
        _report(command, message)
        return code


def _classify(err: Exception) -> tuple[int, str]:
    """Exit code and message of a failure (see the module docstring)."""
    if isinstance(err, SirfFbsemError):
        return err.exit_code, str(err)
    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE, str(err)  # the library's input checks (ValueError) and missing inputs
    if isinstance(err, OSError):
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        return EXIT_RUNTIME, f"{where}{err.strerror or err}"
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return EXIT_RUNTIME, (f"out of device memory ({str(err).splitlines()[0]}); use a smaller batch, "
                              f"fewer channels or --device cpu")
    if isinstance(err, ImportError):
        return EXIT_USAGE, str(err)
    return EXIT_RUNTIME, (f"unexpected {type(err).__name__}: {err} (a bug in sirf_fbsem: please report it with "
                          f"the output of the same command with --debug)")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "reconstruct":
        return run_reconstruct(args)
    if args.command == "simulate":
        return run_simulate(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    if args.command == "export-model":
        return run_export(args)
    raise InputError(f"unknown command {args.command}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
