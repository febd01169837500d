"""Arguments and runner of ``sirf-fbsem simulate`` (also ``pipelines/simulate.py``).

    sirf-fbsem simulate --out data/train --num-samples 100 --scanner small_test --2d
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..argtypes import bounded_int, finite_float, torch_device
from ..errors import InputError
from ..geometry import SCANNER_PRESETS, GeometryError, ImageGeometry, SinogramGeometry, scanner_preset
from ..io.outputs import check_run_directory
from ..projectors.factory import add_backend_argument, check_backend
from .acquisition import AcquisitionParameters, single_slice_geometry
from .dataset import MANIFEST_NAME, SimulationConfig, simulate_dataset
from .phantoms import PHANTOM_KINDS, read_mni152_templates

__all__ = ["add_simulate_arguments", "run_simulate", "geometry_from_args", "config_from_args", "DEFAULT_SPAN"]

#: span used when --span is not given
DEFAULT_SPAN = {"Siemens_mMR": 11, "small_test": 3}



def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image shape must be z,y,x integers, e.g. 15,47,47; got {text!r}") from None
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"image shape must be 3 positive integers z,y,x; got {text!r}")
    return parts  # type: ignore[return-value]


def _count_levels(text: str) -> tuple[float, ...]:
    """``--counts``: one or more comma-separated positive finite numbers."""
    one = finite_float(0.0, strict=True)
    return tuple(one(part) for part in text.split(","))


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    d_acq = AcquisitionParameters()
    d_cfg = SimulationConfig()
    parser.add_argument("--out", type=Path, required=True, help="output directory (sample_NNNNN.pt + manifest.json)")
    parser.add_argument("--num-samples", type=bounded_int(0, 10_000_000), required=True, help="number of samples in the dataset")
    parser.add_argument("--scanner", default="small_test", help="scanner preset: small_test | Siemens_mMR")
    parser.add_argument("--span", type=bounded_int(1), default=None, help=f"axial compression (default {DEFAULT_SPAN})")
    parser.add_argument(
        "--max-ring-diff", type=bounded_int(0), default=None, help="maximum ring difference (default: the largest the span allows)"
    )
    parser.add_argument(
        "--image-shape",
        type=_shape,
        default=None,
        help="image size z,y,x with the scanner's default voxels (default: the scanner's default image)",
    )
    parser.add_argument(
        "--2d",
        dest="two_d",
        action="store_true",
        help="a 2D problem: one ring of the scanner, one direct sinogram, a single-slice image",
    )
    parser.add_argument("--counts", type=_count_levels, default=(d_acq.counts,),
                        help="expected total prompts per sample; several comma-separated levels are cycled by "
                             "sample index (e.g. 3e7,3e8)")
    parser.add_argument("--randoms-fraction", type=finite_float(0.0, 1.0), default=d_acq.randoms_fraction, help="randoms / prompts")
    parser.add_argument("--scatter-fraction", type=finite_float(0.0, 1.0), default=d_acq.scatter_fraction, help="scatter / prompts")
    parser.add_argument("--num-subsets", type=bounded_int(1), default=d_cfg.num_subsets, help="OSEM subsets")
    parser.add_argument(
        "--num-stages", type=bounded_int(1, 1000), default=d_cfg.num_stages, help="K: OSEM sub-iterates stored as targets"
    )
    parser.add_argument("--phantom", choices=PHANTOM_KINDS + ("mixed",), default=d_cfg.phantom,
                        help="phantom kind (mixed: MNI152-based for sample indices 0, 1, 4, 5, 8, ..., procedural for the others)")
    parser.add_argument("--psf-fwhm-mm", type=finite_float(0.0), default=None, help="image-space PSF FWHM of the model, mm")
    parser.add_argument(
        "--detector-gap-period", type=bounded_int(0), default=d_acq.detector_gap_period, help="every k-th detector dead (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed: sample i uses (seed, i)")
    parser.add_argument("--device", type=torch_device, default="cpu", help="torch device of the projector, e.g. cpu or cuda")
    parser.add_argument("--mni152-templates", type=Path, default=None, metavar="FILE.npz",
                        help="MNI152 templates to read instead of nilearn's (the same phantoms; for machines without "
                        "nilearn), written by: python -c 'from sirf_fbsem.simulation.phantoms import "
                        "save_mni152_templates as s; s(\"FILE.npz\")'")
    add_backend_argument(parser)
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="replace an existing dataset in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _default_max_ring_diff(num_rings: int, span: int) -> int:
    if span == 1:
        return num_rings - 1
    half = (span - 1) // 2
    return half + span * ((num_rings - 1 - half) // span)


def geometry_from_args(args: argparse.Namespace) -> tuple[SinogramGeometry, ImageGeometry]:
    """Sinogram and image geometry from the parsed options."""
    scanner = scanner_preset(args.scanner)
    key = next((k for k, v in SCANNER_PRESETS.items() if v == scanner), "")
    if args.two_d:
        sino, image = single_slice_geometry(scanner)
        if args.image_shape is not None:
            nz, ny, nx = args.image_shape
            if nz != 1:
                raise GeometryError(f"--2d needs a single slice; --image-shape gives nz = {nz}")
            image = ImageGeometry((1, ny, nx), image.voxel_size_mm)
        return sino, image
    span = args.span if args.span is not None else DEFAULT_SPAN.get(key, 1)
    mrd = args.max_ring_diff if args.max_ring_diff is not None else _default_max_ring_diff(scanner.num_rings, span)
    sino = SinogramGeometry.from_span(scanner, span=span, max_ring_diff=mrd)
    image = sino.default_image()
    if args.image_shape is not None:
        image = ImageGeometry(args.image_shape, image.voxel_size_mm)
    image.check_fits(sino)
    return sino, image


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    acquisition = AcquisitionParameters(
        counts=args.counts[0],
        randoms_fraction=args.randoms_fraction,
        scatter_fraction=args.scatter_fraction,
        detector_gap_period=args.detector_gap_period,
    )
    return SimulationConfig(
        num_subsets=args.num_subsets,
        num_stages=args.num_stages,
        phantom=args.phantom,
        acquisition=acquisition,
        psf_fwhm_mm=args.psf_fwhm_mm,
        count_levels=args.counts if len(args.counts) > 1 else (),
        mni152_templates=None if args.mni152_templates is None else str(args.mni152_templates),
    )


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``simulate``; returns 0. Errors propagate to the command line's error boundary
    (:func:`sirf_fbsem.cli.main`: one line, exit 2 for invalid settings)."""
    check_backend(args.backend)
    sino, image = geometry_from_args(args)
    config = config_from_args(args)
    if config.mni152_templates is not None:
        if not Path(config.mni152_templates).is_file():
            raise InputError(f"--mni152-templates {config.mni152_templates!r}: no such file")
        if config.phantom == "procedural":
            raise InputError("--mni152-templates applies to --phantom mni152 or mixed; --phantom is procedural")
        read_mni152_templates(config.mni152_templates)  # checked before any sample
    # float32 per sample: prompts, factors, additive, sensitivities (one per subset) and the
    # truth, start image and K targets (an upper bound: the factors may be stored once)
    per_sample = 4 * (3 * math.prod(sino.shape)
                      + (config.num_subsets + config.num_stages + 3) * math.prod(image.shape))
    check_run_directory(args.out, "--out", (Path(args.out) / MANIFEST_NAME).is_file(),
                        f"sirf_fbsem dataset ({MANIFEST_NAME})", estimated_bytes=per_sample * args.num_samples)
    t0 = time.perf_counter()
    files = simulate_dataset(
        args.out,
        args.num_samples,
        sino,
        image,
        config,
        seed=args.seed,
        resume=args.resume,
        progress=args.progress,
        device=args.device,
        backend=args.backend,
    )
    print(
        f"{len(files)} samples in {args.out} ({sino.describe()}; image {image.describe()}; "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    return 0
