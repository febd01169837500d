"""Joseph projection kernels (numba on CPU, vectorised torch): transposition, agreement, physics.

Expected values are ones a physicist can check by hand: chord lengths through a
uniform cylinder, the sinusoid of a point source, STIR's 1/4-1/2-1/4 axial spread.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry, scanner_preset
from sirf_fbsem.projectors import joseph_numba
from sirf_fbsem.projectors.joseph import joseph_adjoint, joseph_forward
from sirf_fbsem.projectors.rays import make_ray_table

BACKENDS = ["numba", "torch"]

SMALL = scanner_preset("small_test")
# few detectors, many rings, small radius: steep LORs whose principal axis is z
STEEP = Scanner(
    name="steep test scanner",
    num_rings=16,
    num_detectors_per_ring=64,
    inner_ring_radius_mm=40.0,
    average_depth_of_interaction_mm=0.0,
    ring_spacing_mm=4.0,
    default_bin_size_mm=4.0,
    max_num_non_arccorrected_bins=16,
    default_num_arccorrected_bins=16,
)


def _case(name: str):
    """(ray table, sinogram geometry) of a named test geometry."""
    if name == "noarc_span3":  # not arc-corrected, span 3, 3 segments
        g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4)
        return make_ray_table(g, g.default_image()), g
    if name == "arc_span3":
        g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4, arc_corrected=True)
        return make_ray_table(g, g.default_image()), g
    if name == "view_subset":
        g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4)
        return make_ray_table(g, g.default_image(), views=np.arange(1, g.num_views, 4)), g
    if name == "span1_thick":  # two axial sub-rays per LOR
        g = SinogramGeometry.from_span(SMALL, span=1, max_ring_diff=3)
        return make_ray_table(g, g.default_image()), g
    if name == "no_fov":
        g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4)
        return make_ray_table(g, g.default_image(), restrict_to_cylindrical_fov=False), g
    if name == "odd_image":  # rows cannot share samples (vz does not divide the axial sampling)
        g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4)
        im = ImageGeometry((11, 30, 41), (2.5, 3.0, 2.2), origin_mm=(1.3, -4.0, 2.5))
        return make_ray_table(g, im), g
    if name == "mmr_span11_rings":  # the mMR's span 11 on 20 of its rings, coarse: segments of consecutive rows
        scanner = dataclasses.replace(scanner_preset("Siemens_mMR"), num_rings=20)
        g = SinogramGeometry.from_span(scanner, span=11, max_ring_diff=16, view_mash_factor=9)
        im = g.default_image()
        return make_ray_table(g, ImageGeometry((im.shape[0], 48, 48), (im.voxel_size_mm[0], 8.0, 8.0))), g
    if name == "steep":  # principal axis z for the largest ring differences
        g = SinogramGeometry.from_span(STEEP, span=1, max_ring_diff=15, view_mash_factor=2)
        return make_ray_table(g, g.default_image()), g
    raise KeyError(name)


CASES = ["noarc_span3", "arc_span3", "view_subset", "span1_thick", "no_fov", "odd_image", "steep", "mmr_span11_rings"]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(20240521)


def _rand(shape, gen, dtype=torch.float64):
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------- transposition


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_adjoint_identity(case, backend, gen):
    rays, _ = _case(case)
    x = _rand((2,) + tuple(rays.image_shape), gen)
    y = _rand((2,) + rays.sinogram_shape, gen)
    ax = joseph_forward(x, rays, backend=backend)
    aty = joseph_adjoint(y, rays, backend=backend)
    assert ax.shape == y.shape and aty.shape == x.shape
    assert ax.dtype == torch.float64 and aty.dtype == torch.float64
    lhs = float((ax * y).sum())
    rhs = float((x * aty).sum())
    assert lhs > 0
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_numba_and_torch_agree(case, gen):
    rays, _ = _case(case)
    x = _rand((1,) + tuple(rays.image_shape), gen)
    y = _rand((1,) + rays.sinogram_shape, gen)
    fn, ft = joseph_forward(x, rays, backend="numba"), joseph_forward(x, rays, backend="torch")
    an, at = joseph_adjoint(y, rays, backend="numba"), joseph_adjoint(y, rays, backend="torch")
    assert float((fn - ft).abs().max()) / float(fn.abs().max()) < 1e-6
    assert float((an - at).abs().max()) / float(an.abs().max()) < 1e-6


def _numba_projections(rays, x: np.ndarray, y: np.ndarray, max_rows: int = joseph_numba.ROWS_PER_BLOCK,
                       columns: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Forward of x and adjoint of y by the numba kernels, with a given block size and kernel choice."""
    from sirf_fbsem.projectors.joseph import _tables

    nz, ny, nx = rays.image_shape
    p = joseph_numba.PAD
    tables = _tables(rays)[:-3] + joseph_numba.row_blocks(
        rays.m, rays.tan_theta, rays.axial_sampling, rays.num_axial_rays, rays.voxel_size[0], max_rows)
    assert tables[-2].max() <= max_rows
    out = np.empty(x.shape[:1] + rays.sinogram_shape, dtype=x.dtype)
    joseph_numba.forward_kernel(joseph_numba.pad_image(x), out, *tables, 2, columns)
    bufs = np.zeros((2, y.shape[0], (nz + 2 * p) * (ny + 2 * p) * (nx + 2 * p)), dtype=y.dtype)
    joseph_numba.adjoint_kernel(y, bufs, *tables, columns)
    img = np.empty(y.shape[:1] + (nz, ny, nx), dtype=y.dtype)
    joseph_numba.reduce_buffers(bufs, img)
    return out, img


@pytest.mark.parametrize("case", ["noarc_span3", "span1_thick", "steep"])
def test_row_blocks_are_a_work_split_only(case, gen):
    """Blocks of 1, 3 or 128 rows give the same projections (1 row: the per-row kernels only)."""
    rays, _ = _case(case)
    x = _rand((1,) + tuple(rays.image_shape), gen).numpy()
    y = _rand((1,) + rays.sinogram_shape, gen).numpy()
    fwd, adj = zip(*(_numba_projections(rays, x, y, max_rows) for max_rows in (1, 3, 128)))
    assert fwd[0].max() > 0 and adj[0].max() > 0
    for f, a in zip(fwd[1:], adj[1:]):
        np.testing.assert_allclose(f, fwd[0], rtol=1e-12, atol=0)
        np.testing.assert_allclose(a, adj[0], rtol=1e-12, atol=1e-12 * float(adj[0].max()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ["noarc_span3", "arc_span3", "view_subset", "no_fov", "mmr_span11_rings"])
def test_column_kernels_equal_the_per_row_kernels(case, dtype, gen):
    """The column kernels (blocks of consecutive rows, z fastest) give the per-row kernels' sums, in
    oblique segments (a run of rows that grows and shrinks plane by plane) and in segment 0, over
    a batch of two; the cases do take the column path (the float32 sums are grouped differently)."""
    rays, _ = _case(case)
    x = _rand((2,) + tuple(rays.image_shape), gen).numpy().astype(dtype)
    y = _rand((2,) + rays.sinogram_shape, gen).numpy().astype(dtype)
    f_col, a_col = _numba_projections(rays, x, y, columns=True)
    f_row, a_row = _numba_projections(rays, x, y, columns=False)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert f_row.max() > 0 and a_row.max() > 0
    assert np.abs(f_col - f_row).max() <= tol * f_row.max()
    assert np.abs(a_col - a_row).max() <= tol * a_row.max()
    if dtype == np.float32:
        assert np.abs(f_col - f_row).max() > 0 and np.abs(a_col - a_row).max() > 0


def test_pad_image_puts_z_fastest():
    """The padded flat image holds voxel (z, y, x) at base + z sz + y sy + x sx, zeros elsewhere."""
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5) + 1.0
    flat = joseph_numba.pad_image(x)
    sz, sy, sx = joseph_numba.layout_strides(3, 4, 5)
    assert sz == 1
    p = joseph_numba.PAD
    base = p * (sz + sy + sx)
    for b, z, y_, x_ in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3), (1, 0, 3, 1)]:
        assert flat[b, base + z * sz + y_ * sy + x_ * sx] == x[b, z, y_, x_]
    assert flat.shape == (2, (3 + 2 * p) * (4 + 2 * p) * (5 + 2 * p))
    assert flat.sum() == x.sum()


def test_cases_cover_the_kernel_paths():
    """The geometries above reach the shared-row path, the one-row path and z-principal rays."""
    rays, _ = _case("noarc_span3")
    start, length, _ = joseph_numba.row_blocks(
        rays.m, rays.tan_theta, rays.axial_sampling, rays.num_axial_rays, rays.voxel_size[0]
    )
    assert length.max() > 1
    rays, _ = _case("odd_image")
    _, length, _ = joseph_numba.row_blocks(
        rays.m, rays.tan_theta, rays.axial_sampling, rays.num_axial_rays, rays.voxel_size[0]
    )
    assert length.max() == 1
    rays, _ = _case("steep")
    principal = set()
    for r in range(rays.m.shape[0]):
        for v in range(rays.cos_phi.shape[0]):
            out = joseph_numba.ray_setup(
                rays.cos_phi[v], rays.sin_phi[v], rays.s[8], rays.m[r], rays.tan_theta[r, 8], rays.fov_radius_mm,
                *rays.image_shape, *rays.voxel_size, *rays.first_voxel,
            )
            principal.add(out[2])
    assert principal == {0, 1, 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_batches_and_dispatch(backend, gen):
    rays, _ = _case("noarc_span3")
    x64 = _rand((3,) + tuple(rays.image_shape), gen)
    y64 = joseph_forward(x64, rays, backend="numba")
    y32 = joseph_forward(x64.float(), rays, backend=backend)
    assert y32.dtype == torch.float32
    assert float((y32.double() - y64).abs().max()) / float(y64.abs().max()) < 1e-5
    # batch items are independent
    y1 = joseph_forward(x64[1:2], rays, backend=backend)
    assert torch.allclose(y1[0], y64[1], rtol=1e-12, atol=0)
    b32 = joseph_adjoint(y64.float(), rays, backend=backend)
    b64 = joseph_adjoint(y64, rays, backend="numba")
    assert b32.dtype == torch.float32
    assert float((b32.double() - b64).abs().max()) / float(b64.abs().max()) < 1e-5
    # "auto" on CPU tensors is the numba kernel
    assert torch.equal(joseph_forward(x64, rays), y64)


def test_bad_arguments():
    rays, _ = _case("noarc_span3")
    x = torch.zeros((1,) + tuple(rays.image_shape))
    with pytest.raises(ValueError, match="backend"):
        joseph_forward(x, rays, backend="cuda")
    with pytest.raises(ValueError, match="shape"):
        joseph_forward(x[:, 1:], rays)
    with pytest.raises(ValueError, match="shape"):
        joseph_adjoint(torch.zeros(rays.sinogram_shape), rays)
    with pytest.raises(TypeError, match="float32 or float64"):
        joseph_forward(x.to(torch.int32), rays)


# ----------------------------------------------------------------------------- physics


def _disc_fraction(im: ImageGeometry, radius: float, sub: int = 8) -> np.ndarray:
    """Fraction of each (y, x) voxel inside the disc |(x, y)| < radius (sub x sub supersampling)."""
    _, yc, xc = im.centred_coordinates_mm()
    vy, vx = im.voxel_size_mm[1], im.voxel_size_mm[2]
    off = (np.arange(sub) + 0.5) / sub - 0.5
    ys = (yc[:, None] + off[None, :] * vy).reshape(-1)
    xs = (xc[:, None] + off[None, :] * vx).reshape(-1)
    inside = (ys[:, None] ** 2 + xs[None, :] ** 2) < radius**2
    return inside.reshape(len(yc), sub, len(xc), sub).mean(axis=(1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_cylinder_gives_chord_lengths(backend):
    g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4)
    im = ImageGeometry((15, 101, 101), (2.0, 2.0, 2.0))
    rays = make_ray_table(g, im, restrict_to_cylindrical_fov=True)
    radius, activity = 60.0, 3.0
    assert radius < rays.fov_radius_mm
    disc = _disc_fraction(im, radius)
    x = torch.from_numpy(np.broadcast_to(disc, im.shape) * activity).unsqueeze(0)
    y = joseph_forward(x, rays, backend=backend)[0].numpy()  # (S, V, N)
    z, _, _ = im.centred_coordinates_mm()
    z_half = z[-1]  # the image planes are the cylinder's axial extent
    s = rays.s[None, :]
    half = np.sqrt(np.clip(radius**2 - s**2, 0, None))
    tan = rays.tan_theta
    chord = 2 * half * np.sqrt(1 + tan**2)
    z_reach = np.abs(rays.m)[:, None] + half * np.abs(tan)
    ok = (np.abs(s) < 0.8 * radius) & (z_reach <= z_half)
    assert ok.sum() > 500 and (ok & (tan != 0)).sum() > 100
    expected = np.broadcast_to((activity * chord)[:, None, :], y.shape)
    mask = np.broadcast_to(ok[:, None, :], y.shape)
    rel = np.abs(y[mask] - expected[mask]) / expected[mask]
    assert rel.max() < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arc_corrected", [True, False])
def test_point_source_lies_on_its_sinusoid(backend, arc_corrected):
    g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4, arc_corrected=arc_corrected)
    im = g.default_image()
    rays = make_ray_table(g, im)
    zc, yc, xc = im.centred_coordinates_mm()
    k, j, i = 7, im.shape[1] // 2 - 4, im.shape[2] // 2 + 6
    x = torch.zeros((1,) + im.shape, dtype=torch.float64)
    x[0, k, j, i] = 1.0
    sino = joseph_forward(x, rays, backend=backend)[0].numpy()
    row = int(np.argmin(np.abs(rays.m[: g.segment(0).num_axial_poss] - zc[k])))  # segment 0 comes first
    assert abs(rays.m[row] - zc[k]) < 1e-9
    s = g.s_mm()
    phi = g.phi_rad()
    for v in range(g.num_views):
        prof = sino[row, v]
        assert prof.sum() > 0
        centroid = float((prof * s).sum() / prof.sum())
        expected = xc[i] * math.cos(phi[v]) + yc[j] * math.sin(phi[v])
        t = int(np.argmin(np.abs(s - expected)))
        bin_width = s[min(t + 1, len(s) - 1)] - s[max(t - 1, 0)]
        assert abs(centroid - expected) < 0.5 * bin_width / 2, (v, centroid, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_source_in_oblique_segments(backend):
    """An oblique LOR through (x, y, z) has m = z + u tan(theta), u = x sin(phi) - y cos(phi)."""
    g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4, arc_corrected=True)
    im = g.default_image()
    rays = make_ray_table(g, im)
    zc, yc, xc = im.centred_coordinates_mm()
    k, j, i = 6, im.shape[1] // 2 + 7, im.shape[2] // 2 - 9
    x = torch.zeros((1,) + im.shape, dtype=torch.float64)
    x[0, k, j, i] = 1.0
    sino = joseph_forward(x, rays, backend=backend)[0].numpy()
    s = g.s_mm()
    phi = g.phi_rad()
    for seg in (1, -1):
        r0 = g.sirf_row_offset(seg)
        rows = slice(r0, r0 + g.segment(seg).num_axial_poss)
        m = rays.m[rows]
        for v in range(0, g.num_views, 5):
            prof = sino[rows, v].sum(axis=1)  # over tangential positions
            assert prof.sum() > 0
            centroid = float((prof * m).sum() / prof.sum())
            s_p = xc[i] * math.cos(phi[v]) + yc[j] * math.sin(phi[v])
            u_p = xc[i] * math.sin(phi[v]) - yc[j] * math.cos(phi[v])
            t = int(np.argmin(np.abs(s - s_p)))
            expected = zc[k] + u_p * rays.tan_theta[r0, t]
            assert abs(centroid - expected) < 0.25 * g.axial_sampling_mm(seg), (seg, v, centroid, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_axial_thickness_quarter_half_quarter(backend):
    """Span 1 on the default image (vz = ring spacing / 2): two sub-rays, STIR's 1/4, 1/2, 1/4."""
    g = SinogramGeometry.from_span(SMALL, span=1, max_ring_diff=3)
    im = g.default_image()
    rays = make_ray_table(g, im)
    seg0 = g.segment(0).num_axial_poss
    assert np.all(rays.num_axial_rays == 2)
    zc, _, _ = im.centred_coordinates_mm()
    row = 3
    k = int(np.argmin(np.abs(zc - rays.m[row])))
    assert abs(zc[k] - rays.m[row]) < 1e-9 and 2 <= k < im.shape[0] - 2
    # batch items 0-4: plane k-2 ... k+2 uniform, the rest 0; item 5: every plane uniform
    planes = range(k - 2, k + 3)
    x = torch.zeros((6,) + im.shape, dtype=torch.float64)
    for b, plane in enumerate(planes):
        x[b, plane] = 1.0
    x[5] = 1.0
    y = joseph_forward(x, rays, backend=backend)[:, row].numpy()
    full = y[5]
    hit = full > 0
    assert hit.sum() > 100
    for b, expected in enumerate([0.0, 0.25, 0.5, 0.25, 0.0]):
        np.testing.assert_allclose(y[b][hit], expected * full[hit], rtol=1e-12, atol=1e-12)
    # the same through the adjoint: one LOR back-projected
    y = torch.zeros((1,) + rays.sinogram_shape, dtype=torch.float64)
    y[0, row, 5, g.num_tangential_poss // 2 + 3] = 1.0
    per_plane = joseph_adjoint(y, rays, backend=backend)[0].sum(dim=(1, 2)).numpy()
    np.testing.assert_allclose(per_plane[k - 1 : k + 2] / per_plane.sum(), [0.25, 0.5, 0.25], rtol=1e-12)
    assert row < seg0


@pytest.mark.parametrize("backend", BACKENDS)
def test_rays_along_the_axes_through_voxel_centres(backend):
    """phi = 0 and s on a voxel column, no FOV limit: the sum of the column times vy, exactly."""
    g = SinogramGeometry.from_span(SMALL, span=3, max_ring_diff=4, arc_corrected=True)
    im = g.default_image()  # vxy = bin size: s = t * bin lands on voxel centres
    rays = make_ray_table(g, im, restrict_to_cylindrical_fov=False)
    assert rays.sin_phi[0] == 0.0
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((1,) + im.shape, generator=gen, dtype=torch.float64)
    y = joseph_forward(x, rays, backend=backend)[0].numpy()
    _, _, xc = im.centred_coordinates_mm()
    nz = im.shape[0]
    row = nz // 2  # segment 0, m on plane nz // 2
    for t in (10, 24, 30):
        i = int(np.argmin(np.abs(xc - rays.s[t])))
        assert abs(xc[i] - rays.s[t]) < 1e-9
        expected = float(x[0, row, :, i].sum()) * im.voxel_size_mm[1]
        assert y[row, 0, t] == pytest.approx(expected, rel=1e-12)
