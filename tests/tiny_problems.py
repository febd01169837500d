"""A tiny 2D PET problem shared by the tests: one-ring geometry, disc phantoms, simulated samples
(as the simulation writes them) and a small FBSEM network."""
from __future__ import annotations

import torch

from sirf_fbsem.geometry import ImageGeometry, Scanner, SinogramGeometry
from sirf_fbsem.model import FBSEMNet, RegulariserConfig
from sirf_fbsem.projectors.embedded import EmbeddedAcquisitionModel
from sirf_fbsem.recon import fov_mask
from sirf_fbsem.samples import Sample
from sirf_fbsem.simulation.targets import osem_targets

__all__ = ["tiny2d_geometry", "tiny_phantom", "tiny_samples", "small_net", "perturb"]


def tiny2d_geometry(num_detectors: int = 64, num_bins: int = 32) -> tuple[SinogramGeometry, ImageGeometry]:
    """One ring (so one sinogram, z = 0), 32 views x 32 bins, and a 1 x 32 x 32 image of 4 mm voxels."""
    sc = Scanner(
        name="tiny 2D", num_rings=1, num_detectors_per_ring=num_detectors, inner_ring_radius_mm=70.0,
        average_depth_of_interaction_mm=0.0, ring_spacing_mm=4.0, default_bin_size_mm=4.0,
        max_num_non_arccorrected_bins=num_bins, default_num_arccorrected_bins=num_bins,
    )
    sino = SinogramGeometry.from_span(sc, span=1, max_ring_diff=0)
    return sino, ImageGeometry((1, 32, 32), (4.0, 4.0, 4.0))


def tiny_phantom(image: ImageGeometry, gen: torch.Generator) -> torch.Tensor:
    """A disc body with 1-3 hot/cold discs, activity ~1 (Bq/ml-like units)."""
    _, y, x = image.centred_coordinates_mm()
    Y, X = torch.meshgrid(torch.as_tensor(y), torch.as_tensor(x), indexing="ij")
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))  # noqa: E731
    r_body = u(35.0, 45.0)
    img = (X**2 + Y**2 < r_body**2).double() * u(0.8, 1.2)
    for _ in range(1 + int(torch.randint(3, (), generator=gen))):
        cx, cy, r = u(-20, 20), u(-20, 20), u(4.0, 10.0)
        img = img + ((X - cx) ** 2 + (Y - cy) ** 2 < r**2).double() * u(-0.6, 2.0) * (img > 0)
    return img.clamp_min(0).float().unsqueeze(0)  # (1, Y, X)


def tiny_samples(
    num_samples: int = 8,
    num_subsets: int = 4,
    num_targets: int = 4,
    counts: float = 2e4,
    seed: int = 0,
    anatomical: bool = False,
) -> tuple[EmbeddedAcquisitionModel, list[Sample]]:
    """Samples as the simulation writes them: prompts, factors, additive term, subset sensitivities,
    and targets = OSEM sub-iterates 1..K of the noise-free data (start image 1 inside the FOV)."""
    sino, image = tiny2d_geometry()
    base = EmbeddedAcquisitionModel(sino, image, num_subsets=num_subsets)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        phantom = tiny_phantom(image, gen)
        mult = 0.5 + 0.5 * torch.rand(sino.shape, generator=gen)  # normalisation x attenuation stand-in
        geo = base.with_terms(mult, None).direct(phantom)
        scale = counts / float(geo.sum())
        mult = mult * scale
        additive = torch.full(sino.shape, 0.1 * counts / geo.numel())
        model = base.with_terms(mult, additive)
        ybar = model.forward(phantom)
        prompts = torch.poisson(ybar, generator=gen)
        # the start image the trainer uses, under the network's (count-matched) start rule
        targets = osem_targets(model, ybar, num_targets, initial=fov_mask(image).float())
        samples.append(Sample(
            prompts=prompts,
            multiplicative=mult,
            additive=additive,
            sensitivity=torch.stack([model.sensitivity(s) for s in range(num_subsets)]),
            targets=targets,
            phantom=phantom,
            anatomical=(phantom > 0).float() + 0.5 * (phantom > phantom.mean()).float() if anatomical else None,
        ))
    return base, samples


def small_net(num_stages: int = 4, num_subsets: int = 4, beta_init: float = 0.1, seed: int = 0,
              beta_counts: str = "log_linear", **kw) -> FBSEMNet:
    torch.manual_seed(seed)
    reg = RegulariserConfig(dims=2, channels=8, layers=3, **kw)
    return FBSEMNet(num_stages, num_subsets, reg, beta_init=beta_init, beta_counts=beta_counts)


def perturb(net: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move the (zero-initialised) last layers off zero so the CNNs do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
