"""The embedded projector's Joseph and Siddon modes against SIRF/STIR's ray-tracing matrix.

Needs ``sirf.STIR``. In one run, on this machine:

(a) rows: STIR's matrix row of single bins (SIRF's back projection of a one-hot sinogram
    through ``AcquisitionModelUsingRayTracingMatrix``) against the embedded Siddon row
    (its back projection of the same sinogram), for bins of direct and oblique segments,
    edge and central tangential positions, views around 0, 45, 90 and 135 degrees, with 1
    and 2 tangential LORs, on a small 3-segment scanner (span 3) and on STIR's recon_demo
    geometry; and, on the whole Siemens mMR span-11 sinogram, every bin's row applied to
    an image of uniform random numbers (a row error anywhere shows in its bin);
(b) forward projections: relative L2 and sum ratio, Joseph and Siddon against SIRF, on the
    mMR span-11 sinogram (a smooth test image) and on SIRF's brain and thorax examples
    (their own emission images);
(c) OSEM, 4 subsets x 4 iterations, of STIR's recon_demo ``smalllong.hs`` (measured and
    noise-free data) against SIRF's ``OSMAPOSLReconstructor`` with the same settings:
    NRMSE inside the FOV and scale, for Joseph and Siddon;
(d) speed: forward and back projection seconds on the mMR span-11 sinogram, SIRF, Joseph
    and Siddon on the same image in the same run (after one warm-up call each for the
    embedded modes; SIRF's first call includes its matrix set-up, as a user's would).

Prints a table and writes ``pipelines/results/siddon_vs_sirf.json``.

    python pipelines/compare_sirf_osem.py            # everything (about 10 minutes on 2 cores)
    python pipelines/compare_sirf_osem.py --skip-mmr # no mMR parts (about 1 minute)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
PET_EXAMPLES = SHARED / "sirf" / "examples" / "PET"
SMALLLONG = SHARED / "stir" / "examples" / "recon_demo" / "smalllong.hs"
DEFAULT_OUT = REPO / "pipelines" / "results" / "siddon_vs_sirf.json"
MODES = ("joseph", "siddon")


def _pet():
    import sirf.STIR as pet

    pet.set_verbosity(0)
    pet.MessageRedirector(info=None, warn=None)
    pet.AcquisitionData.set_storage_scheme("memory")
    return pet


def _sirf_model(pet, acq, image, num_tangential_LORs=1):
    am = pet.AcquisitionModelUsingRayTracingMatrix()
    am.set_num_tangential_LORs(num_tangential_LORs)
    am.set_up(acq, image)
    return am


def _embedded(sino, img, mode, **kw):
    from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel

    return EmbeddedAcquisitionModel(sino, img, ray_tracing=mode, **kw)


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    return {"rel_l2": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
            "sum_ratio": float(ours.sum() / theirs.sum()),
            "max_abs_diff_over_max": float(np.abs(ours - theirs).max() / np.abs(theirs).max())}


# ----------------------------------------------------------------------------- (a) rows


def small_oblique_geometry():
    """A small cylindrical scanner, span 3 (segments -1, 0, 1), not arc-corrected, and its default image."""
    from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry

    sc = Scanner(name="tiny", num_rings=6, num_detectors_per_ring=48, inner_ring_radius_mm=60.0,
                 average_depth_of_interaction_mm=4.0, ring_spacing_mm=4.0, default_bin_size_mm=5.0,
                 max_num_non_arccorrected_bins=20, default_num_arccorrected_bins=20)
    g = SinogramGeometry.from_span(sc, span=3, max_ring_diff=4)
    d = g.default_image()
    return g, ImageGeometry((d.shape[0], 15, 15), d.voxel_size_mm)


def row_bins(sino) -> list[tuple[int, int, int]]:
    """(SIRF row, view, tangential index) of a handful of bins: direct/oblique, edges, 0/45/90/135 degrees."""
    V, N = sino.num_views, sino.num_tangential_poss
    rows = []
    for n in sino.sirf_segment_order():
        r0 = sino.sirf_row_offset(n)
        k = sino.segment(n).num_axial_poss
        rows += [r0, r0 + k // 2]
    views = sorted({0, 1, V // 4, V // 4 + 1, V // 2, 3 * V // 4 - 1, V - 1})
    tangs = sorted({0, 1, N // 2 - 1, N // 2, N // 2 + 1, N - 2, N - 1})
    bins = []
    for i, r in enumerate(rows):
        for j, v in enumerate(views):
            t = tangs[(i + j) % len(tangs)]
            bins.append((r, v, t))
    return bins


def compare_rows(pet, sino, img, num_tangential_LORs, bins) -> dict:
    """Embedded Siddon rows vs STIR's (one-hot back projections), per bin."""
    from sirf_fbsem.projectors.sirf import sirf_templates

    acq, image = sirf_templates(sino, img)
    am = _sirf_model(pet, acq, image, num_tangential_LORs)
    model = _embedded(sino, img, "siddon", num_tangential_LORs=num_tangential_LORs, dtype=torch.float64)
    worst, n_exact, out = 0.0, 0, []
    for (r, v, t) in bins:
        onehot = np.zeros(acq.shape, dtype=np.float32)
        onehot[0, r, v, t] = 1.0
        a = acq.get_uniform_copy(0.0)
        a.fill(onehot)
        theirs = np.asarray(am.backward(a).as_array(), dtype=np.float64)
        ours = model.adjoint(torch.from_numpy(onehot.astype(np.float64))).numpy()
        scale = max(float(np.abs(theirs).max()), 1e-30)
        err = float(np.abs(ours - theirs).max()) / scale
        worst = max(worst, err)
        n_exact += err < 1e-5
        out.append({"bin": [r, v, t], "max_abs_diff_over_row_max": err, "nonzeros_stir": int((theirs != 0).sum()),
                    "nonzeros_embedded": int((np.abs(ours) > 1e-12).sum()), "row_sum_stir": float(theirs.sum()),
                    "row_sum_embedded": float(ours.sum())})
    return {"geometry": sino.describe(), "image": img.describe(), "num_tangential_LORs": num_tangential_LORs,
            "num_bins": len(bins), "bins_within_1e-5": n_exact, "worst_max_abs_diff_over_row_max": worst,
            "bins": out}


# ----------------------------------------------------------------------------- (b), (d) projections


def _blob(shape, voxel_size) -> np.ndarray:
    nz, ny, nx = shape
    vz, vy, vx = voxel_size
    y = (np.arange(ny) - ny // 2) * vy
    x = (np.arange(nx) - nx // 2) * vx
    plane = np.exp(-(y[:, None] ** 2 + (x[None, :] - 20) ** 2) / (2 * 60.0**2))
    plane += 0.5 * ((y[:, None] + 30) ** 2 + x[None, :] ** 2 < 30.0**2)
    axial = 1.0 + 0.5 * np.sin(np.linspace(0, np.pi, nz))
    return (axial[:, None, None] * plane[None]).astype(np.float32)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def mmr(pet) -> dict:
    """mMR span 11: forward projections of a smooth image (Joseph, Siddon vs SIRF), every bin's row on a
    random image (Siddon vs SIRF), and forward/back projection times."""
    from sirf_fbsem.projectors.sirf import image_geometry_from_sirf, sinogram_geometry_from_sirf

    acq = pet.AcquisitionData("Siemens_mMR", span=11, max_ring_diff=60)
    image = acq.create_uniform_image(0.0, xy=128)
    sino, img = sinogram_geometry_from_sirf(acq), image_geometry_from_sirf(image)
    blob = _blob(img.shape, img.voxel_size_mm)
    rand = np.random.default_rng(0).random(img.shape).astype(np.float32)
    res = {"geometry": sino.describe(), "image": img.describe(), "threads": torch.get_num_threads()}
    am = _sirf_model(pet, acq, image)
    image.fill(blob)
    y_sirf, t_fwd_sirf = _timed(lambda: np.asarray(am.forward(image).as_array()[0], dtype=np.float64))
    ysino = acq.get_uniform_copy(0.0)
    ysino.fill(y_sirf[None].astype(np.float32))
    x_sirf, t_bwd_sirf = _timed(lambda: np.asarray(am.backward(ysino).as_array(), dtype=np.float64))
    image.fill(rand)
    y_sirf_rand = np.asarray(am.forward(image).as_array()[0], dtype=np.float64)
    res["speed_s"] = {"sirf": {"forward": t_fwd_sirf, "backward": t_bwd_sirf}}
    res["forward_smooth"], res["backward_of_sirf_projection"], res["forward_random"] = {}, {}, {}
    xb = torch.from_numpy(blob)
    for mode in MODES:
        model = _embedded(sino, img, mode)
        model.direct(xb[:, :8, :8].new_zeros(img.shape))  # warm-up: plans, JIT
        model.adjoint(torch.zeros(model.sinogram_shape))
        y, t_f = _timed(lambda: model.direct(xb)[0].numpy())
        x, t_b = _timed(lambda: model.adjoint(torch.from_numpy(y_sirf[None].astype(np.float32))).numpy())
        res["speed_s"][mode] = {"forward": t_f, "backward": t_b}
        res["forward_smooth"][mode] = _agreement(y, y_sirf)
        res["backward_of_sirf_projection"][mode] = _agreement(x, x_sirf)
        res["forward_random"][mode] = _agreement(model.direct(torch.from_numpy(rand))[0].numpy(), y_sirf_rand)
    return res


def examples(pet) -> dict:
    from sirf_fbsem.io.interfile import read_image, sinogram_geometry_from_header
    from sirf_fbsem.projectors.sirf import sirf_templates

    out = {}
    for name in ("brain", "thorax_single_slice"):
        folder = PET_EXAMPLES / name
        if not folder.is_dir():
            continue
        geom, emission = read_image(folder / "emission.hv")
        sino = sinogram_geometry_from_header(folder / "template_sinogram.hs")
        acq, image = sirf_templates(sino, geom)
        x = np.asarray(emission, dtype=np.float32)
        image.fill(x)
        y_sirf = np.asarray(_sirf_model(pet, acq, image).forward(image).as_array()[0], dtype=np.float64)
        out[name] = {m: _agreement(_embedded(sino, geom, m).direct(torch.from_numpy(x))[0].numpy(), y_sirf)
                     for m in MODES}
    return out


# ----------------------------------------------------------------------------- (c) OSEM


def _osmaposl(pet, data, image, num_subsets: int, num_subiterations: int) -> tuple[np.ndarray, float]:
    am = _sirf_model(pet, data, image)
    obj = pet.make_Poisson_loglikelihood(data, acq_model=am)
    recon = pet.OSMAPOSLReconstructor()
    recon.set_objective_function(obj)
    recon.set_num_subsets(num_subsets)
    recon.set_num_subiterations(num_subiterations)
    t = time.perf_counter()
    recon.set_up(image)
    recon.set_current_estimate(image)
    recon.process()
    return np.asarray(recon.get_output().as_array(), dtype=np.float64), time.perf_counter() - t


def osem_smalllong(pet, num_subsets: int = 4, num_subiterations: int = 16) -> dict:
    from scipy.ndimage import gaussian_filter

    from sirf_fbsem.io.interfile import read_projdata
    from sirf_fbsem.projectors.sirf import image_geometry_from_sirf
    from sirf_fbsem.recon.engine import EMUpdate, fov_mask, reconstruct

    geom, prompts = read_projdata(SMALLLONG, allow_negative=True)
    prompts = np.maximum(prompts, 0)  # recon_demo's data are precorrected: both get the same counts
    acq = pet.AcquisitionData(str(SMALLLONG))
    data = acq.get_uniform_copy(0.0)
    data.fill(prompts.reshape(data.shape))
    image = data.create_uniform_image(1.0)
    img = image_geometry_from_sirf(image)
    inside = fov_mask(img).numpy()
    truth = image.clone()
    res = {"geometry": geom.describe(), "image": img.describe(), "num_subsets": num_subsets,
           "num_subiterations": num_subiterations}
    theirs, t_sirf = _osmaposl(pet, data, image, num_subsets, num_subiterations)
    truth.fill(gaussian_filter(theirs, 2.0).astype(np.float32))
    noise_free = _sirf_model(pet, data, image).forward(truth)
    theirs_nf, _ = _osmaposl(pet, noise_free, image, num_subsets, num_subiterations)
    res["sirf_seconds"] = t_sirf
    for mode in MODES:
        model = _embedded(geom, img, mode, num_subsets=num_subsets)
        t = time.perf_counter()
        ours = reconstruct(model, torch.from_numpy(prompts), EMUpdate(), num_subiterations).numpy().astype(np.float64)
        t = time.perf_counter() - t
        ours_nf = reconstruct(model, torch.from_numpy(np.asarray(noise_free.as_array())), EMUpdate(),
                              num_subiterations).numpy().astype(np.float64)
        a, b = ours[inside], theirs[inside]
        res[mode] = {
            "measured": {"nrmse_fov": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                         "scale_fov": float(a.sum() / b.sum()),
                         "nrmse_fov_smoothed_1.5": float(np.linalg.norm(gaussian_filter(ours, 1.5)[inside]
                                                                        - gaussian_filter(theirs, 1.5)[inside])
                                                         / np.linalg.norm(gaussian_filter(theirs, 1.5)[inside])),
                         "max_abs_diff_over_max": float(np.abs(a - b).max() / np.abs(b).max())},
            "noise_free": {"nrmse_fov": float(np.linalg.norm(ours_nf[inside] - theirs_nf[inside])
                                              / np.linalg.norm(theirs_nf[inside])),
                           "scale_fov": float(ours_nf[inside].sum() / theirs_nf[inside].sum())},
            "seconds": t,
        }
    return res


# ----------------------------------------------------------------------------- main


def _print(results: dict) -> None:
    print("\n(a) rows: embedded Siddon vs STIR's ProjMatrixByBinUsingRayTracing (one-hot back projections)")
    for r in results["rows"]:
        print(f"  {r['geometry'][:60]:60s} n_tan={r['num_tangential_LORs']}: {r['bins_within_1e-5']}/{r['num_bins']}"
              f" bins within 1e-5 of the row max; worst {r['worst_max_abs_diff_over_row_max']:.2e}")
    if "mmr" in results:
        m = results["mmr"]
        print("\n(b) forward projections vs SIRF (relative L2 / sum ratio / max |diff| over max)")
        for key, label in (("forward_smooth", "mMR span 11, smooth image"), ("forward_random", "mMR span 11, random image"),
                           ("backward_of_sirf_projection", "mMR span 11, back projection")):
            for mode in MODES:
                a = m[key][mode]
                print(f"  {label:32s} {mode:6s}: {a['rel_l2']:.2e} / {a['sum_ratio']:.6f} / {a['max_abs_diff_over_max']:.2e}")
    for name, d in results.get("examples", {}).items():
        for mode in MODES:
            a = d[mode]
            print(f"  {name:32s} {mode:6s}: {a['rel_l2']:.2e} / {a['sum_ratio']:.6f} / {a['max_abs_diff_over_max']:.2e}")
    o = results["osem_smalllong"]
    print(f"\n(c) OSEM {o['num_subsets']} subsets x {o['num_subiterations'] // o['num_subsets']} iterations of smalllong.hs"
          " vs SIRF OSMAPOSL (NRMSE in FOV / scale)")
    for mode in MODES:
        r = o[mode]
        print(f"  {mode:6s}: measured {r['measured']['nrmse_fov']:.2e} / {r['measured']['scale_fov']:.7f}"
              f" (smoothed {r['measured']['nrmse_fov_smoothed_1.5']:.2e});"
              f" noise-free {r['noise_free']['nrmse_fov']:.2e} / {r['noise_free']['scale_fov']:.7f}")
    if "mmr" in results:
        s = results["mmr"]["speed_s"]
        print(f"\n(d) speed, mMR span 11, {results['mmr']['threads']} threads (forward / back, s)")
        for k in ("sirf",) + MODES:
            print(f"  {k:6s}: {s[k]['forward']:.2f} / {s[k]['backward']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-mmr", action="store_true", help="leave out the mMR span-11 parts (the slow ones)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    pet = _pet()
    from sirf_fbsem.io.interfile import read_projdata

    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads()}}
    t0 = time.perf_counter()
    rows = []
    sino, img = small_oblique_geometry()
    for n_tan in (1, 2):
        rows.append(compare_rows(pet, sino, img, n_tan, row_bins(sino)))
    if SMALLLONG.is_file():
        from sirf_fbsem.projectors.sirf import image_geometry_from_sirf

        geom, _ = read_projdata(SMALLLONG, allow_negative=True)
        img_sl = image_geometry_from_sirf(pet.AcquisitionData(str(SMALLLONG)).create_uniform_image(1.0))
        for n_tan in (1, 2):
            rows.append(compare_rows(pet, geom, img_sl, n_tan, row_bins(geom)))
    results["rows"] = rows
    results["examples"] = examples(pet)
    results["osem_smalllong"] = osem_smalllong(pet)
    if not args.skip_mmr:
        results["mmr"] = mmr(pet)
    results["seconds"] = time.perf_counter() - t0
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
