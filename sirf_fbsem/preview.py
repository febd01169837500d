"""Quick-look PNG montages of ``(Z, Y, X)`` images (matplotlib, Agg; no pyplot state).

One row per image: ``num_slices`` evenly spaced axial (transverse) slices, then a
coronal and a sagittal maximum-intensity projection. Each row has its own grey
scale from min(0, image min) to a high percentile of the image (99.9 by default, so that
a few hot voxels, e.g. point sources, do not wash out the rest; 100 = the max). Written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .io.atomic import atomic_path
from .io.outputs import PNG_SOFTWARE, PlannedOutput, absolute, check_replaceable

__all__ = ["save_montage"]

def _as_rows(image) -> list[tuple[str | None, np.ndarray]]:
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("save_montage needs at least one image, got an empty list")
        rows = []
        for n, entry in enumerate(image):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                title, arr = entry
            elif isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
                arr, title = entry
            else:
                title, arr = None, entry
            rows.append((title, _as_volume(arr, f"image[{n}]")))
        return rows
    return [(None, _as_volume(image, "image"))]


def _as_volume(arr, what: str) -> np.ndarray:
    if hasattr(arr, "detach"):  # torch tensor
        arr = arr.detach().cpu().numpy()
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or min(a.shape) < 1:
        raise ValueError(f"{what} must be a (Z, Y, X) array, got shape {a.shape}")
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def save_montage(
    path: str | os.PathLike,
    image,
    num_slices: int = 8,
    title: str | None = None,
    cmap: str = "gray_r",
    voxel_size_mm: Sequence[float] | None = None,
    vmax_percentile: float = 99.9,
    overwrite: bool = True,
) -> Path:
    """Save a PNG montage of axial slices plus coronal and sagittal MIPs; return the path.

    ``image``: a ``(Z, Y, X)`` array (numpy or torch), or a list of them, each entry
    either an array or a ``(title, array)`` pair. ``num_slices`` axial slices are
    taken evenly from the first to the last plane (fewer if the image has fewer).
    ``voxel_size_mm`` ``(vz, vy, vx)`` sets the aspect of the projections (default
    isotropic). ``cmap`` is any matplotlib colour map (``gray_r``, ``hot``, ...).
    ``vmax_percentile`` (0 < p <= 100): top of each row's grey scale, as a percentile of
    that row's voxel values (values above saturate). An existing file at ``path`` is
    replaced only when this package wrote it (PNG ``Software`` text chunk) and ``overwrite``;
    any other file is refused (:class:`~sirf_fbsem.errors.OutputPathError`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if int(num_slices) < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if not 0 < float(vmax_percentile) <= 100:
        raise ValueError(f"vmax_percentile must be in (0, 100], got {vmax_percentile}")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"montage path must end in .png, got {str(path)!r}")
    check_replaceable(PlannedOutput(absolute(target), "png", ""), overwrite)
    rows = _as_rows(image)
    vz, vy, vx = (1.0, 1.0, 1.0) if voxel_size_mm is None else (float(v) for v in voxel_size_mm)
    ncols = min(int(num_slices), max(r[1].shape[0] for r in rows)) + 2

    fig = Figure(figsize=(1.6 * ncols, 1.7 * len(rows) + (0.4 if title else 0.0)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (row_title, vol) in enumerate(rows):
        nz = vol.shape[0]
        vmax = float(vol.max()) if vmax_percentile >= 100 else float(np.percentile(vol, vmax_percentile))
        vmin = min(0.0, float(vol.min()))
        if vmax <= vmin:
            vmax = vmin + 1.0
        ks = np.unique(np.linspace(0, nz - 1, min(int(num_slices), nz)).round().astype(int))
        for c in range(len(ks), ncols - 2):
            axes[r, c].set_axis_off()
        for c in list(range(len(ks))) + [ncols - 2, ncols - 1]:
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        for c, k in enumerate(ks):
            ax = axes[r, c]
            ax.imshow(vol[k], cmap=cmap, vmin=vmin, vmax=vmax, aspect=vy / vx, interpolation="nearest")
            ax.set_title(f"z={k}", fontsize=7)
        # coronal: max over y -> (z, x); sagittal: max over x -> (z, y); superior plane first is
        # not known here, so planes are shown in array order (k = 0 at the top).
        ax = axes[r, ncols - 2]
        ax.imshow(vol.max(axis=1), cmap=cmap, vmin=vmin, vmax=vmax, aspect=vz / vx, interpolation="nearest")
        ax.set_title("coronal MIP", fontsize=7)
        ax = axes[r, ncols - 1]
        ax.imshow(vol.max(axis=2), cmap=cmap, vmin=vmin, vmax=vmax, aspect=vz / vy, interpolation="nearest")
        ax.set_title("sagittal MIP", fontsize=7)
        if row_title:
            axes[r, 0].set_ylabel(row_title, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    return target
