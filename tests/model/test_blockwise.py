"""Block-wise regulariser (model/blockwise.py): equal to the whole-volume CNN in values and gradients,
memory bounded by the block, a runtime setting of the network (not of its file)."""
from __future__ import annotations

import pytest
import torch

from sirf_fbsem.model import FBSEMNet, RegulariserConfig, ResidualCNN, load_model, save_model
from sirf_fbsem.model.blockwise import apply_blockwise, block_regions, check_block_shape, grown_region, receptive_radius
from sirf_fbsem.samples import Batch
from sirf_fbsem.training import TrainConfig, training_step, with_terms_factory
from tiny_problems import perturb, small_net, tiny2d_geometry, tiny_samples

#: (Z, Y, X) = (5, 7, 9): no block shape below divides it
SHAPE = (5, 7, 9)
BLOCKS = [(2, 3, 4), (1, 1, 1), (50, 50, 50), (5, 7, 9), (3, 1, 7), (1, 7, 2)]


def _cnn(dims: int, anatomical: bool, dtype=torch.float64, channels: int = 4, layers: int = 3) -> ResidualCNN:
    torch.manual_seed(0)
    cnn = ResidualCNN(dims=dims, channels=channels, layers=layers, in_channels=2 if anatomical else 1).to(dtype)
    perturb(cnn, scale=0.2)  # the last layer starts at zero: move it so f is not 0
    return cnn


def _grads(cnn: ResidualCNN, x: torch.Tensor, u: torch.Tensor | None, mask: torch.Tensor, g: torch.Tensor):
    out = cnn(x, u, mask)
    wrt = [x] + ([u] if u is not None else []) + list(cnn.parameters())
    return out.detach(), torch.autograd.grad(out, wrt, g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def problem():
    """2 samples (with an anatomical image), 2 subsets, 2 targets, on the 1 x 32 x 32 test image."""
    return tiny_samples(num_samples=2, num_subsets=2, num_targets=2, anatomical=True)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("anatomical", [False, True])
def test_blockwise_equals_whole_volume_values_and_gradients_float64(dims, anatomical):
    """Values and gradients (input, anatomical image, parameters) on an odd-shaped volume, for blocks that do
    not divide it, 1-voxel blocks, blocks larger than the volume; float64: equal to rounding."""
    cnn = _cnn(dims, anatomical)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((2,) + SHAPE, generator=gen, dtype=torch.float64).requires_grad_()
    u = torch.rand(SHAPE, generator=gen, dtype=torch.float64).requires_grad_() if anatomical else None
    mask = torch.rand(SHAPE, generator=gen) > 0.2
    ref, ref_grads = _grads(cnn, x, u, mask, g := torch.randn((2,) + SHAPE, generator=gen, dtype=torch.float64))
    for block in BLOCKS:
        cnn.block_shape = block
        out, grads = _grads(cnn, x, u, mask, g)
        assert _rel(out, ref) < 1e-12, block
        for a, b in zip(grads, ref_grads):
            assert _rel(a, b) < 1e-12, block
    cnn.block_shape = None
    assert torch.equal(cnn(x, u, mask), ref)


@pytest.mark.parametrize("dims", [2, 3])
def test_blockwise_equals_whole_volume_float32(dims):
    # float32: the block's convolutions sum in another order than the whole volume's: ~1e-7 relative
    cnn = _cnn(dims, anatomical=False, dtype=torch.float32, channels=8)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand((1, 6, 11, 10), generator=gen).requires_grad_()
    g = torch.randn((1, 6, 11, 10), generator=gen)
    ref, ref_grads = _grads(cnn, x, None, x.detach() > 0.1, g)
    cnn.block_shape = (4, 4, 3)
    out, grads = _grads(cnn, x, None, x.detach() > 0.1, g)
    assert _rel(out, ref) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) < 1e-5


def test_blocks_tile_the_volume_and_margins_are_clipped():
    regions = list(block_regions(SHAPE, (2, 3, 4)))
    cover = torch.zeros(SHAPE, dtype=torch.int64)
    for r in regions:
        cover[r] += 1
    assert len(regions) == 3 * 3 * 3 and bool((cover == 1).all())
    # as equal as possible, none larger than the block: 50 in blocks of 24 is 16 + 17 + 17, not 24 + 24 + 2
    sizes = [r[2].stop - r[2].start for r in block_regions((1, 1, 50), (1, 1, 24))]
    assert sorted(sizes) == [16, 17, 17]
    assert [r[0] for r in block_regions((4, 1, 1), (9, 9, 9))] == [slice(0, 4)]
    outer, inner = grown_region((slice(0, 2), slice(3, 6), slice(8, 9)), (0, 2, 2), SHAPE)
    assert outer == (slice(0, 2), slice(1, 7), slice(6, 9))  # clipped at y = 7 and x = 9, not padded
    assert inner == (slice(0, 2), slice(2, 5), slice(2, 3))
    assert receptive_radius(5, 3, 3) == (5, 5, 5) and receptive_radius(5, 3, 2) == (0, 5, 5)
    assert receptive_radius(2, 5, 3) == (4, 4, 4)


def test_no_grad_runs_without_checkpoints_and_gives_the_same_image():
    cnn = _cnn(3, anatomical=False, dtype=torch.float32)
    x = torch.rand(1, *SHAPE)
    ref = cnn(x)
    cnn.block_shape = (2, 2, 2)
    with torch.no_grad():
        out = cnn(x)
    assert out.grad_fn is None and _rel(out, ref) < 1e-6
    h = cnn.normalise(x, None, torch.ones(1), None)
    with torch.no_grad():  # explicitly without checkpointing, and with it, under grad
        a = apply_blockwise(cnn.body_whole, h, (3, 3, 3), cnn.receptive_radius, checkpointing=False)
    b = apply_blockwise(cnn.body_whole, h, (3, 3, 3), cnn.receptive_radius, checkpointing=True)
    assert torch.equal(a, b.detach())


@pytest.mark.parametrize("bad", [(0, 4, 4), (4, 4), (4, 4, 4, 4), (2.0, 4, 4), "444", (True, 4, 4), 8])
def test_bad_block_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="three positive integers"):
        check_block_shape(bad)
    with pytest.raises(ValueError, match="TrainConfig.block_shape"):
        TrainConfig(block_shape=bad)
    with pytest.raises(ValueError, match="block_shape"):
        small_net().set_block_shape(bad)


def test_set_block_shape_is_a_runtime_setting_of_every_stage(problem, tmp_path):
    """Same outputs with blocks; not in the network's config, state dict or model file."""
    base, samples = problem
    torch.manual_seed(0)
    net = FBSEMNet(3, 2, RegulariserConfig(dims=3, channels=4, layers=3, in_channels=2))
    perturb(net)
    batch = Batch.collate(samples, "cpu")
    model = with_terms_factory(base)(batch)
    kw = {"sensitivities": batch.sensitivity, "anatomical": batch.anatomical}
    x0 = torch.ones((2,) + tuple(base.image_shape))
    ref = net(x0, batch.prompts, model, **kw)
    keys, config = list(net.state_dict()), net.config()
    net.set_block_shape((1, 5, 7))
    assert net.block_shape == (1, 5, 7) and all(st.regulariser.block_shape == (1, 5, 7) for st in net.stages)
    assert list(net.state_dict()) == keys and net.config() == config
    assert _rel(net(x0, batch.prompts, model, **kw), ref) < 1e-5
    sino, image = tiny2d_geometry()
    loaded, _ = load_model(save_model(tmp_path / "m.pt", net, {"sinogram_geometry": sino, "image_geometry": image}))
    assert loaded.block_shape is None  # a file holds no block shape: the reader chooses
    net.set_block_shape(None)
    assert net.block_shape is None and torch.equal(net(x0, batch.prompts, model, **kw), ref)


@pytest.mark.parametrize("mode", ["sequential", "checkpointed"])
def test_training_step_gradients_are_those_of_the_whole_volume(problem, mode):
    """Blocks inside stage checkpoints (nested non-reentrant checkpoints) and in sequential steps."""
    base, samples = problem
    batch = Batch.collate(samples, "cpu")
    model = with_terms_factory(base)(batch)
    grads = []
    for block in (None, (1, 6, 5)):
        net = small_net(num_stages=2, num_subsets=2)
        perturb(net)
        net.set_block_shape(block)
        training_step(net, mode, batch, model, TrainConfig(), stage=0 if mode == "sequential" else None)
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert _rel(b, a) < 1e-4


# ----------------------------------------------------------------------------- memory
def _saved_bytes(fn) -> tuple[int, int]:
    """(sum of numel * element size of every tensor saved for backward during ``fn()``, bytes of the distinct
    storages they live in)."""
    total, storages = 0, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total, sum(storages.values())


def test_blockwise_saved_memory_is_bounded_by_the_block():
    """Bytes saved for backward by one stage's regulariser (detached input, as in sequential training).

    Whole volume: every hidden activation is saved, >= (L - 1) C volumes. Block-wise the body saves
    nothing but its checkpoints' inputs, crops of h grown by R (views of h, C_in channels); outside the
    body the finish saves relu's output (1 volume) and scalars. So, per voxel of the volume, block-wise::

        saved / (V * 4 bytes) <= C_in * prod((b + 2R) / b) + 1 + (scalars)

    whatever the volume (24^3 and 48^3 here, blocks of 8^3, R = 3: bound 5.36 + 1); the distinct storages
    behind them are h and relu's output, ~2 volumes. In the backward pass one block at a time is
    recomputed: it saves ((L - 1) C + 1) * prod(b + 2R) voxels (and the weights), not a multiple of V.
    """
    channels, layers, block = 16, 3, (8, 8, 8)
    cnn = _cnn(3, anatomical=False, dtype=torch.float32, channels=channels, layers=layers)
    r = cnn.receptive_radius[0]
    bound = 1 * ((8 + 2 * r) / 8) ** 3 + 1 + 0.01
    ratios = []
    for n in (24, 48):
        x = torch.rand(1, n, n, n)
        fov = torch.ones(n, n, n, dtype=torch.bool)
        volume = 4 * n**3
        cnn.block_shape = None
        whole, _ = _saved_bytes(lambda: cnn(x, None, fov))
        cnn.block_shape = block
        blocks, distinct = _saved_bytes(lambda: cnn(x, None, fov))
        assert whole / volume >= (layers - 1) * channels
        assert blocks / volume <= bound, (n, blocks / volume, bound)
        assert distinct / volume <= 2.01
        assert blocks < whole / 4
        ratios.append(blocks / volume)
    assert ratios[1] <= bound and ratios[1] < 1.3 * ratios[0]  # does not grow with the volume
    crop = torch.rand(1, 1, *(b + 2 * r for b in block))
    per_block, _ = _saved_bytes(lambda: cnn.body_whole(crop))
    weights = sum(4 * p.numel() for p in cnn.parameters())  # the convolutions save their weights too
    assert per_block <= ((layers - 1) * channels + 1) * 4 * crop.numel() + weights


def test_memory_benchmark_with_blocks_measures_the_same_step_in_less_tensor_memory():
    """pipelines/bench_training_memory.py --block-size (the block-wise rows of the 3D mMR memory table):
    the worker's step with the CNNs in blocks has the whole-volume step's loss, in both modes, and a
    lower peak of live tensors (MemTracker, where this torch has it) on the benchmark's quick problem."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "pipelines" / "bench_training_memory.py"
    spec = importlib.util.spec_from_file_location("bench_training_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for mode in ("sequential", "end_to_end"):
        whole = bench.run_worker(mode, 2, "cpu", "quick", None, tensor_memory=True)
        blocks = bench.run_worker(mode, 2, "cpu", "quick", None, tensor_memory=True, block_shape=(8, 16, 16))
        assert whole["block_shape"] is None and blocks["block_shape"] == [8, 16, 16]
        assert blocks["loss"] == pytest.approx(whole["loss"], rel=1e-5), mode
        if "tensor_peak_mb" in whole:
            assert blocks["tensor_peak_mb"] < 0.8 * whole["tensor_peak_mb"], (mode, blocks, whole)


# ----------------------------------------------------------------------------- command line
def test_reconstruct_block_size_gives_the_same_image_and_needs_a_model(tmp_path, capsys):
    from pathlib import Path

    import nibabel as nib

    from sirf_fbsem.cli import main

    data = Path(__file__).resolve().parents[2] / "test_data"
    scan, model = data / "phantom_scan.hs", data / "fbsem_model.pt"
    for extra, flag in [(["--block-size", "4,8,8"], "--block-size"),
                        (["--model", str(model), "--block-size", "4,0,8"], "--block-size"),
                        (["--model", str(model), "--block-size", "4,8"], "--block-size")]:
        try:
            rc = main(["reconstruct", str(scan), "--output", str(tmp_path / "x.nii.gz"), "--no-progress", *extra])
        except SystemExit as exit_:  # argparse's own usage errors
            rc = exit_.code
        err = capsys.readouterr().err
        assert rc == 2 and flag in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "x.nii.gz").exists()
    images = []
    for name, extra in (("whole", []), ("blocks", ["--block-size", "15,30,24"])):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["reconstruct", str(scan), "--model", str(model), "--output", str(out), "--no-progress",
                     *extra]) == 0
        images.append(nib.load(out).get_fdata())
    assert abs(images[0] - images[1]).max() <= 1e-5 * abs(images[0]).max()


@pytest.mark.parametrize("dims", [2, 3])
def test_onednn_convolutions_of_blocks_give_autograds_values_and_gradients(dims):
    """Blocks and patches call oneDNN directly (PyTorch sends small float32 inputs to a slower kernel);
    the convolutions' gradients are then oneDNN convolutions too: equal to autograd's to rounding."""
    from sirf_fbsem.model.regularisers import conv_relu_stack

    torch.manual_seed(0)
    cnn = ResidualCNN(dims=dims, in_channels=2, channels=6, layers=4)
    perturb(cnn, scale=0.5)
    with torch.no_grad():
        for m in cnn.net[0::2]:
            m.bias.sub_(0.3)  # dead ReLUs
    shape = (3, 2, 5, 9, 9) if dims == 3 else (3, 2, 9, 9)
    h = torch.randn(shape, requires_grad=True)
    w = torch.randn((shape[0], 1) + shape[2:])
    results = []
    for onednn in (False, True):
        cnn.zero_grad(set_to_none=True)
        h.grad = None
        out = conv_relu_stack(cnn.net, h, onednn)
        (out * w).sum().backward()
        with torch.no_grad():
            assert _rel(conv_relu_stack(cnn.net, h, onednn), out) < 1e-6
        results.append([out, h.grad.clone()] + [p.grad.clone() for p in cnn.parameters()])
    for a, b in zip(*results):
        assert _rel(b, a) < 1e-5
