"""Write a Siemens mMR ECAT8 component-based normalisation (``.n`` + ``.n.hdr``): the inverse of :mod:`.ecat8_norm`.

Why components and not an efficiency sinogram: a user's real mMR workflow has the scanner's
``norm.n`` (a few hundred kB of components), not a 290 MB span-11 sinogram of efficiencies;
writing the same kind of file lets simulated data go through the same ``--norm norm.n.hdr``
path, the package's reader and STIR's ``BinNormalisationFromECAT8`` alike.

The bin efficiency both compute from the components (see :mod:`.ecat8_norm`) is::

    eff(bin) = sum_u c[t, u % 9] sum_{(r1, r2) in bin} e[r1, d1(u, t)] e[r2, d2(u, t)] g[r1 + r2, t] / a[idx(r1, r2)]

==========================  =====================  ==================================================
component (file order)      array here             shape, meaning
==========================  =====================  ==================================================
1 geometric effects         ``geometric``          (2 rings - 1, T): ``g[ring1 + ring2, t + T//2]``
2 crystal interference      ``interference``       (T, 9): ``c[t + T//2, view % 9]``
3 crystal efficiencies      ``crystal_efficiencies``  (rings, detectors): ``e[ring, crystal]`` as STIR
                                                   uses them (after its one-crystal shift)
4 axial effects             ``axial_effects``      (sinograms of the span-11 layout,): ``a``, ECAT order
5, 6 ring dead-time         (not used by STIR)     (rings,): 0
7 crystal dead-time         (not used by STIR)     (9,): 0
8 additional axial effects  (not used by STIR)     (sinograms,): 1
==========================  =====================  ==================================================

STIR shifts the mMR's crystal efficiencies by one crystal after reading them
(``e[r, c] = e_file[r, c - 1]``) and zeroes the gap crystals (``c % 9 == 0``); the writer
stores ``e_file[r, c] = e[r, c + 1]`` so that reading gives ``crystal_efficiencies`` back,
with the gap crystals 0 whatever was given there. Binary layout and header keys follow a real
mMR ``norm.n.hdr`` (components one after another, float32 little endian).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry import Scanner, SinogramGeometry, scanner_preset
from .atomic import atomic_path
from .petlink_writer import header_and_data_paths

__all__ = ["ECAT8NormComponents", "write_ecat8_norm"]

#: transaxial crystals per mMR block, the one virtual gap crystal included (STIR's Scanner)
CRYSTALS_PER_BLOCK = 9


@dataclass(frozen=True)
class ECAT8NormComponents:
    """The four components STIR uses, in the arrays :class:`~sirf_fbsem.io.ecat8_norm.ECAT8Norm` reads back.

    ``span`` / ``max_ring_diff``: the layout of ``axial_effects`` (the mMR's norm: span 11,
    maximum ring difference 60, 837 sinograms). Validated against ``scanner`` by
    :meth:`check`; every value finite, ``axial_effects`` > 0.
    """

    geometric: np.ndarray
    interference: np.ndarray
    crystal_efficiencies: np.ndarray
    axial_effects: np.ndarray
    span: int = 11
    max_ring_diff: int = 60

    def check(self, scanner: Scanner) -> None:
        """Raise ``ValueError`` naming the component whose shape or values do not fit ``scanner``."""
        nr, nd, T = scanner.num_rings, scanner.num_detectors_per_ring, scanner.max_num_non_arccorrected_bins
        num_axial = SinogramGeometry.from_span(scanner, self.span, self.max_ring_diff).num_sinograms
        expected = {"geometric": (2 * nr - 1, T), "interference": (T, CRYSTALS_PER_BLOCK),
                    "crystal_efficiencies": (nr, nd), "axial_effects": (num_axial,)}
        for name, shape in expected.items():
            a = np.asarray(getattr(self, name))
            if a.shape != shape:
                raise ValueError(f"ECAT8 norm component '{name}' has shape {a.shape}; the {scanner.name} "
                                 f"(span {self.span}, max ring difference {self.max_ring_diff}) needs {shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"ECAT8 norm component '{name}' has non-finite values")
        if np.any(np.asarray(self.axial_effects) <= 0):
            raise ValueError("ECAT8 norm component 'axial_effects' must be > 0 (STIR divides by it)")


def _header_lines(data_name: str, sizes: list[tuple[int, ...]], offsets: list[int], labels: list[str],
                  comp: ECAT8NormComponents, scanner: Scanner) -> list[str]:
    """The keys of a real mMR ``norm.n.hdr`` that STIR and :func:`~sirf_fbsem.io.ecat8_norm.read_ecat8_norm` read."""
    lines = ["!INTERFILE:=", "%comment:=simulated ECAT8 normalisation written by sirf_fbsem",
             "!originating system:=2008", "%SMS-MI header name space:=normalization header",
             "%SMS-MI version number:=3.4", "!GENERAL DATA:=",
             "data description:=PET scanner normalization Coefficients", f"!name of data file:={data_name}",
             "!GENERAL IMAGE DATA:=", "image data byte order:=LITTLEENDIAN", "!PET data type:=normalization",
             "%data format:=sinogram - expandable from norm components", "number format:=float",
             "number of bytes per pixel:=4", "%NORMALIZATION COMPONENTS DESCRIPTION:=",
             f"%number of normalization components:={len(sizes)}"]
    lines += [f"%normalization component [{i}]:={label}" for i, label in enumerate(labels, start=1)]
    lines += [f"data offset in bytes [{i}]:={o}" for i, o in enumerate(offsets, start=1)]
    lines += [f"number of dimensions [{i}]:={len(s)}" for i, s in enumerate(sizes, start=1)]
    lines += [f"%matrix size [{i}]:={{{','.join(str(n) for n in s)}}}" for i, s in enumerate(sizes, start=1)]
    lines += [f"%axial compression:={comp.span}", f"%maximum ring difference:={comp.max_ring_diff}",
              f"number of rings:={scanner.num_rings}", "%number of buckets:=12", "!END OF INTERFILE:="]
    return lines


def write_ecat8_norm(header_path: str | os.PathLike, components: ECAT8NormComponents,
                     scanner: Scanner | str = "Siemens_mMR", overwrite: bool = False) -> Path:
    """Write ``components`` as ``<name>.n`` + its header ``<name>.n.hdr``; returns the header path.

    ``header_path`` must end in ``.n.hdr``; the data file is the same name without ``.hdr``.
    Existing files are refused (``FileExistsError``) unless ``overwrite``. Both files are
    written atomically (data first). :func:`~sirf_fbsem.io.ecat8_norm.read_ecat8_norm` of the
    result gives ``components`` back (gap crystals 0), to float32 precision.
    """
    sc = scanner_preset(scanner) if isinstance(scanner, str) else scanner
    header, data = header_and_data_paths(header_path, ".n", overwrite)
    components.check(sc)
    # STIR reads e[r, c] = e_file[r, c - 1]: store e_file[r, c] = e[r, c + 1]
    file_eff = np.roll(np.asarray(components.crystal_efficiencies, dtype=np.float32), -1, axis=1)
    nr, n_axial = sc.num_rings, components.axial_effects.size
    blocks = [np.asarray(components.geometric), np.asarray(components.interference), file_eff,
              np.asarray(components.axial_effects), np.zeros(nr), np.zeros(nr), np.zeros(CRYSTALS_PER_BLOCK),
              np.ones(n_axial)]
    labels = ["geometric effects", "crystal interference", "crystal efficiencies", "axial effects",
              "paralyzing ring DT parameters", "non-paralyzing ring DT parameters", "TX crystal DT parameter",
              "additional axial effects"]
    sizes = [tuple(reversed(b.shape)) for b in blocks]  # Interfile lists the fastest axis first
    offsets = list(np.cumsum([0] + [4 * b.size for b in blocks[:-1]]).astype(int))
    with atomic_path(data) as tmp:
        tmp.write_bytes(b"".join(np.ascontiguousarray(b, dtype="<f4").tobytes() for b in blocks))
    with atomic_path(header) as tmp:
        tmp.write_text("\n".join(_header_lines(data.name, sizes, offsets, labels, components, sc)) + "\n",
                       encoding="ascii")
    return header
