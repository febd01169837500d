"""Command line: ``sirf-fbsem reconstruct | simulate | train | evaluate``.

Each sub-command maps its flags one to one onto library calls; nothing here computes.
Under ``torchrun`` (``torchrun --nproc-per-node N -m sirf_fbsem train|reconstruct ...``)
``train`` trains data-parallel and ``reconstruct`` shares its inputs among the ranks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .projectors.factory import add_backend_argument, check_backend

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sirf-fbsem", description="FBSEM-Net PET reconstruction for SIRF/STIR data.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reconstruct", help="reconstruct sinograms (.hs) or mMR listmode (.l.hdr)")
    r.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="Interfile sinogram .hs or listmode header .l.hdr; several inputs, @LIST.txt "
                        "(one path a line) or a quoted glob ('scans/*.hs') with --output-dir")
    r.add_argument("--output", "-o", type=Path, help="output image of a single input: .nii, .nii.gz or .hv")
    r.add_argument("--output-dir", type=Path,
                   help="batch: write DIR/<input stem><--format> for every input (existing outputs are "
                        "skipped; summary in DIR/reconstruct_summary.json; torchrun shares the inputs among ranks)")
    r.add_argument("--format", dest="output_format", choices=["nii.gz", "nii", "hv"], default="nii.gz",
                   help="batch output format (default nii.gz)")
    r.add_argument("--algorithm", choices=["osem", "mlem", "fbsem"], default=None,
                   help="default: fbsem when --model is given, else osem")
    r.add_argument("--model", type=Path, help="trained FBSEM model file (.pt)")
    r.add_argument("--override-geometry", action="store_true",
                   help="use a model trained on another geometry (not recommended)")
    r.add_argument("--iterations", type=int, default=4, help="OSEM/MLEM iterations (default 4)")
    r.add_argument("--subsets", type=int, default=None, help="OSEM subsets (default 4; FBSEM: the model's)")
    r.add_argument("--norm", type=Path, help="normalisation: mMR .n.hdr or efficiency sinogram .hs")
    r.add_argument("--mu-map", type=Path, help="attenuation map in 1/cm (.hv or NIfTI)")
    r.add_argument("--additive", type=Path, help="randoms + scatter sinogram .hs (counts)")
    r.add_argument("--time", nargs=2, type=float, metavar=("T0", "T1"), help="listmode time interval, s")
    r.add_argument("--span", type=int, default=11, help="listmode histogramming span (1 or 11)")
    r.add_argument("--negative", choices=["zero", "error"], default="zero",
                   help="negative prompts (precorrected data): clip to 0 with a warning (default) or stop")
    r.add_argument("--psf-fwhm", type=float, default=0.0, help="image-space PSF FWHM, mm (0 = none)")
    r.add_argument("--dicom", type=Path,
                   help="also write a DICOM PET series into this directory (batch: into DIR/<input stem>/)")
    r.add_argument("--preview", type=Path, help="also write a PNG montage (batch: a directory, DIR/<input stem>.png)")
    r.add_argument("--patient-position", default="HFS", choices=["HFS", "HFP", "FFS", "FFP"])
    r.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_backend_argument(r)
    r.add_argument("--no-progress", action="store_true")

    for name, helptext in (("simulate", "simulate training data"), ("train", "train FBSEM-Net")):
        sp = sub.add_parser(name, help=helptext)
        try:
            if name == "simulate":
                from .simulation.cli import add_simulate_arguments

                add_simulate_arguments(sp)
            else:
                from .training.cli import add_train_arguments

                add_train_arguments(sp)
        except ImportError as err:  # pragma: no cover - only while a part is missing
            sp.set_defaults(_missing=str(err))

    ev = sub.add_parser("evaluate", help="compare OSEM, MAP-EM and FBSEM on held-out phantoms")
    try:
        from .evaluation import add_evaluate_arguments

        add_evaluate_arguments(ev)
    except ImportError as err:  # pragma: no cover
        ev.set_defaults(_missing=str(err))
    return p


def run_reconstruct(args: argparse.Namespace) -> int:
    """One input with ``--output`` (as always), or a batch with ``--output-dir`` (sharded across
    torchrun ranks); returns 1 when any input of a batch failed."""
    from .batch import BatchItem, expand_inputs, plan_outputs, run_batch
    from .distributed import init_distributed, local_device, shutdown

    check_backend(args.backend)
    algorithm = args.algorithm or ("fbsem" if args.model else "osem")
    if algorithm == "fbsem" and args.model is None:
        raise SystemExit("sirf-fbsem reconstruct: --algorithm fbsem needs --model MODEL.pt")
    inputs = expand_inputs(args.inputs)
    if args.output is not None and args.output_dir is not None:
        raise SystemExit("sirf-fbsem reconstruct: give --output (one input) or --output-dir (a batch), not both")
    if args.output_dir is None:
        if args.output is None:
            raise SystemExit("sirf-fbsem reconstruct: --output FILE (one input) or --output-dir DIR is required")
        if len(inputs) != 1:
            raise SystemExit(f"sirf-fbsem reconstruct: {len(inputs)} inputs need --output-dir DIR, not --output")
        _check_output_suffix(args.output)
    ctx = init_distributed(args.device)
    try:
        device = local_device(args.device, ctx.local_rank) if ctx.is_distributed else args.device
        progress = not args.no_progress and ctx.is_main
        if args.output_dir is None and not ctx.is_distributed:
            _reconstruct_one(args, inputs[0], args.output, args.dicom, args.preview, algorithm, device, progress)
            return 0
        if args.output_dir is None:  # one input under torchrun: rank 0 writes it, as a single process would
            items = [BatchItem(inputs[0], args.output)]
        else:
            items = plan_outputs(inputs, args.output_dir, "." + args.output_format)

        def process(item: BatchItem) -> None:
            dicom, preview = args.dicom, args.preview
            if args.output_dir is not None:  # per-input places inside the given directories
                stem = item.output.name[: -len("." + args.output_format)]
                dicom = None if dicom is None else dicom / stem
                preview = None if preview is None else preview / f"{stem}.png"
            _reconstruct_one(args, item.input, item.output, dicom, preview, algorithm, device, progress)

        results = run_batch(
            items, process, ctx,
            summary_path=None if args.output_dir is None else args.output_dir / "reconstruct_summary.json",
            skip_existing=args.output_dir is not None,
        )
        failed = [r for r in results if r.status == "failed"]
        if ctx.is_main and args.output_dir is not None:
            counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
            print(f"reconstruct: {len(results)} inputs on {ctx.world_size} rank(s): {counts['written']} written, "
                  f"{counts['skipped']} skipped (output exists), {counts['failed']} failed; summary "
                  f"{args.output_dir / 'reconstruct_summary.json'}")
            for r in failed:
                print(f"  failed: {r.input}: {r.error}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        shutdown(ctx)


def _check_output_suffix(out: Path) -> None:
    name = out.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz") or name.endswith(".hv")):
        raise SystemExit(f"sirf-fbsem reconstruct: --output must end in .nii, .nii.gz or .hv, got {out}")


def _reconstruct_one(args: argparse.Namespace, input_path: Path, output: Path, dicom: Path | None,
                     preview: Path | None, algorithm: str, device: str, progress: bool) -> None:
    """Reconstruct ``input_path`` and write ``output`` (+ DICOM series, preview), each atomically."""
    import numpy as np

    from .acquisition import load_acquisition

    t0 = time.perf_counter()
    acq = load_acquisition(
        input_path,
        norm=args.norm,
        mu_map=args.mu_map,
        additive=args.additive,
        time_interval_s=tuple(args.time) if args.time else None,
        span=args.span,
        negative=args.negative,
        progress=progress,
        backend=args.backend,
    )
    image_geom = acq.geometry.default_image()
    from .reconstructor import reconstruct_acquisition

    x, description = reconstruct_acquisition(
        acq,
        image_geom,
        algorithm=algorithm,
        model_path=args.model,
        override_geometry=args.override_geometry,
        num_iterations=args.iterations,
        num_subsets=args.subsets,
        psf_fwhm_mm=args.psf_fwhm,
        device=device,
        progress=progress,
        backend=args.backend,
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

    Each file is written atomically; when one fails, those already written for this input are
    removed, so a failed input leaves nothing behind.
    """
    written: list[Path] = []
    try:
        _write_each(args, out, dicom, preview, input_path, image, image_geom, acq, description, written)
    except BaseException:
        import shutil

        for path in written:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _write_each(args: argparse.Namespace, out: Path, dicom: Path | None, preview: Path | None,
                input_path: Path, image, image_geom, acq, description: str, written: list[Path]) -> None:
    if dicom:
        from .io.dicom import radiopharmaceutical_from_header, write_dicom_series

        extra = {}
        hdr = acq.metadata.get("listmode_header")
        info = None if hdr is None else radiopharmaceutical_from_header(hdr)
        if info is not None:
            extra["radiopharmaceutical"] = info
        write_dicom_series(dicom, image, image_geom, acq.geometry.scanner,
                           patient_position=args.patient_position, series_description=description,
                           units="BQML" if acq.multiplicative is not None else "CNTS", **extra)
        written.append(Path(dicom))
    if preview:
        from .preview import save_montage

        save_montage(preview, image, title=f"{Path(input_path).name}: {description}",
                     voxel_size_mm=image_geom.voxel_size_mm)
        written.append(Path(preview))
    name = out.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        from .io.nifti import write_nifti

        write_nifti(out, image, image_geom, acq.geometry.scanner, patient_position=args.patient_position,
                    description=description)
    else:
        from .io.interfile import write_image

        write_image(out, image_geom, image)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        parser.error(f"'{args.command}' is unavailable: {args._missing}")
    try:
        if args.command == "reconstruct":
            return run_reconstruct(args)
        if args.command == "simulate":
            from .simulation.cli import run_simulate

            return run_simulate(args)
        if args.command == "train":
            from .training.cli import run_train

            return run_train(args)
        if args.command == "evaluate":
            from .evaluation import run_evaluate

            return run_evaluate(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sirf-fbsem {args.command}: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
