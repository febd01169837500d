"""What the count level of count-aware stages costs per training sample, with the support's projection
shared by the per-sample models and without (the behaviour before 0.9.1).

    python pipelines/bench_count_level.py                    # the mMR 3D study's setting, ~3 min on 2 cores
    python pipelines/bench_count_level.py --span 11 --image 127 128 128 --subsets 7 --samples 4

Setting (printed and written to the JSON): the Siemens mMR, span ``--span`` with ring differences up
to 60, an image of ``--image`` voxels on the mMR's default voxels, ``--subsets`` subsets, subset 0;
``--samples`` per-sample models made as the trainer makes them (``base.with_terms(factors, additive)``
with each sample's own efficiencies in [0.5, 1.5] and a flat additive term), Poisson prompts of a
uniform cylinder. For each sample, measured one after the other in the same run:

* ``before_s``: what each sample's stage terms cost for it before 0.9.1: ``copy.direct(support, s)``
  (a projection per copy) and :func:`estimated_counts` in one block (``sinograms_per_block=None``:
  full-size float64 temporaries);
* ``shared_s``: ``copy.support_projection(s)`` (the projection without the factors is made once for
  all copies; the first sample pays it, the median is over the others) and the blocked sums (0.9.1);
* ``projection_per_copy_s``, ``projection_shared_s``, ``estimate_one_block_s``, ``estimate_blocked_s``:
  the four parts alone;
* ``em_update_s``: one OSEM sub-update of the sample (a subset forward and back projection), the
  rest of a sample's stage terms, for scale.

Both ways give the same count level (checked: relative difference printed and asserted < 1e-5).
``count_level`` is ``N_hat`` of the whole acquisition (the subset's estimate times ``--subsets``, as
the stages use it), in counts.
Writes ``pipelines/results/bench_count_level.{json,png}`` (``--out`` to change the stem).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sirf_fbsem.autograd import em_update  # noqa: E402
from sirf_fbsem.geometry import ImageGeometry, SinogramGeometry, scanner_preset  # noqa: E402
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel  # noqa: E402
from sirf_fbsem.recon.count_level import estimated_counts  # noqa: E402

RESULTS = ROOT / "pipelines" / "results"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--span", type=int, default=11)
    parser.add_argument("--image", type=int, nargs=3, default=[127, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--subsets", type=int, default=7)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--counts", type=float, default=3e7, help="prompts per sample (full acquisition)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_count_level",
                        help="output stem (.json and .png are added)")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error("--samples must be at least 2 (the first sample pays the shared projection)")

    torch.manual_seed(0)
    sino = SinogramGeometry.from_span(scanner_preset("Siemens_mMR"), span=args.span, max_ring_diff=60)
    image = ImageGeometry(tuple(args.image), sino.default_image().voxel_size_mm)
    base = EmbeddedAcquisitionModel(sino, image, num_subsets=args.subsets)
    support = base.support()  # as the trainer's model factory: computed once, shared by every copy
    z, y, x = (torch.as_tensor(c, dtype=torch.float32) for c in image.centred_coordinates_mm())
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    phantom = ((yy**2 + xx**2 < 80.0**2) & (zz.abs() < 90.0)).float() * support
    s = 0
    geometric_mean = base.direct(phantom)  # factors 1: G x
    rows = []
    for i in range(args.samples):
        gen = torch.Generator().manual_seed(100 + i)
        factors = 0.5 + torch.rand(sino.shape, generator=gen)
        additive = torch.full(sino.shape, 0.2)
        mean = factors * geometric_mean + additive
        prompts = torch.poisson(mean * (args.counts / float(mean.sum())), generator=gen)
        add = additive * (args.counts / float(mean.sum()))
        model = base.with_terms(factors, add)
        y_s = model.take_subset(prompts, s)
        m_copy, proj_copy = timed(lambda: model.direct(support.float(), s))
        m_shared, proj_shared = timed(lambda: model.support_projection(s))
        old, est_one = timed(lambda: estimated_counts(y_s, model.additive_term(s), m_copy, sinograms_per_block=None))
        new, est_blocked = timed(lambda: estimated_counts(y_s, model.additive_term(s), m_shared))
        _, em = timed(lambda: em_update(torch.ones(image.shape), y_s, model, s))
        rel = float((new - old).abs().max() / old.abs().max())
        assert rel < 1e-5, f"sample {i}: the shared projection and blocked sums give another count level ({rel:.2e})"
        row = {"sample": i, "before_s": proj_copy + est_one, "shared_s": proj_shared + est_blocked,
               "projection_per_copy_s": proj_copy, "projection_shared_s": proj_shared,
               "estimate_one_block_s": est_one, "estimate_blocked_s": est_blocked, "em_update_s": em,
               "count_level": float(new[0]) * args.subsets, "relative_difference": rel}
        rows.append(row)
        print(f"sample {i}: before {row['before_s']:.2f} s (projection {proj_copy:.2f} + estimate {est_one:.2f}), "
              f"now {row['shared_s']:.2f} s ({proj_shared:.2f} + {est_blocked:.2f}), EM sub-update {em:.2f} s, "
              f"N_hat {row['count_level']:.3g} of {float(prompts.sum()):.3g} prompts (rel. difference {rel:.1e})")
    later = rows[1:]
    keys = ["before_s", "shared_s", "projection_per_copy_s", "projection_shared_s", "estimate_one_block_s",
            "estimate_blocked_s", "em_update_s"]
    summary = {f"{k}_median": statistics.median(r[k] for r in later) for k in keys}
    summary["first_sample_projection_shared_s"] = rows[0]["projection_shared_s"]
    summary["before_over_now"] = summary["before_s_median"] / summary["shared_s_median"]
    summary["now_over_em_update"] = summary["shared_s_median"] / summary["em_update_s_median"]
    summary["before_over_em_update"] = summary["before_s_median"] / summary["em_update_s_median"]
    result = {
        "setting": {"scanner": "Siemens_mMR", "span": args.span, "max_ring_diff": 60, "image": args.image,
                    "voxel_mm": list(image.voxel_size_mm), "sinogram": list(sino.shape), "subsets": args.subsets,
                    "subset": s, "counts": args.counts, "samples": args.samples,
                    "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
        "samples": rows,
        "summary": summary,
        "note": "medians over samples 2.. (the first pays the shared projection); same run, same machine",
    }
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = ["projection\nper copy", "projection\nshared", "estimate\none block", "estimate\nblocked",
             "EM\nsub-update"]
    values = [summary[f"{k}_median"] for k in ("projection_per_copy_s", "projection_shared_s", "estimate_one_block_s",
                                               "estimate_blocked_s", "em_update_s")]
    ax.bar(names, values, color=["tab:red", "tab:green", "tab:red", "tab:green", "tab:gray"])
    ax.set_ylabel("seconds per sample (median)")
    ax.set_title(f"count level per sample, mMR span {args.span}, subset {s} of {args.subsets}")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return result


if __name__ == "__main__":
    main()
