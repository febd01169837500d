"""Training data held in memory: every sample read once and kept in RAM or on the training device.

Sequential training reads each sample at least once per stage: K reads with patches (the stage
terms, from which validation and the next stage's inputs are computed), K stages x (2 + epochs)
without. A 3D mMR sample is about 1.3 GB (three span-11 sinograms of 837 x 252 x 344 float32, plus
the targets and sensitivities), so at K = 42 reading from disk dominates a GPU run; held on the GPU,
a read is free. ``train --preload``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..samples import Sample

__all__ = ["PRELOAD_CHOICES", "ResidentDataset", "dataset_files", "available_bytes"]

#: where ``train --preload`` holds the samples: nowhere (read per use), RAM, the training device
PRELOAD_CHOICES = ("none", "cpu", "device")
#: share of the free memory the samples may take (the rest: the network, its activations, the cache)
MAX_SHARE = 0.85


def dataset_files(dataset) -> list[Path]:
    """The sample files behind ``dataset`` (a dataset with ``files``, or a ConcatDataset of such); [] if unknown."""
    if hasattr(dataset, "files"):
        return [Path(f) for f in dataset.files]
    if hasattr(dataset, "datasets"):
        return [f for d in dataset.datasets for f in dataset_files(d)]
    return []


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: ``mem_get_info``; CPU: MemAvailable); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        return _meminfo_available()
    return None


class ResidentDataset(Sequence[Sample]):
    """The samples of ``dataset``, each loaded once and held on ``device`` (``dataset[i]`` then costs nothing).

    Before loading anything, the samples' size (their files' bytes) is checked against
    :data:`MAX_SHARE` of the device's free memory: :class:`~sirf_fbsem.errors.InputError` naming
    ``flag``, the sizes and the way out otherwise.

    Args:
        dataset: indexable samples (e.g. :class:`~sirf_fbsem.simulation.dataset.FBSEMSampleDataset`).
        device: where the tensors are held ("cpu" or the training device, e.g. "cuda:0").
        flag: the option the user set, for messages.
        progress: show a progress bar while loading.
    """

    def __init__(self, dataset, device: str | torch.device, flag: str = "--preload", progress: bool = True):
        self.device = torch.device(device)
        files = dataset_files(dataset)
        need = sum(f.stat().st_size for f in files)
        free = available_bytes(self.device)
        if files and free is not None and need > MAX_SHARE * free:
            raise InputError(
                f"{flag}: the {len(files)} training samples take {need / 2**30:.1f} GiB "
                f"({str(files[0].parent)!r}...), more than {MAX_SHARE:.0%} of the {free / 2**30:.1f} GiB free on "
                f"{self.device}; use fewer samples, another {flag} (e.g. 'cpu' or 'none'), or a device with more memory"
            )
        self._samples = [
            self._to_device(dataset[i])
            for i in tqdm(range(len(dataset)), desc=f"loading samples onto {self.device}", disable=not progress,
                          leave=False)
        ]

    def _to_device(self, sample: Sample) -> Sample:
        moved = {}
        for name, value in vars(sample).items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(self.device, copy=True)  # in memory, not mapped from its file
        return sample.replace(**moved)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        return self._samples[index]
