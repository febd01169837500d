"""The phantom sets of a study and the rule that keeps them apart.

A study uses three disjoint sets of simulated phantoms (docs/studies/rules.md): a training set
(with its validation split), a tuning set on which every choice is made (hyperparameters,
baselines' beta / FWHM / iterations, defaults), and a confirmation set scored once, after all
choices are frozen. A simulated sample ``i`` of a dataset with base seed ``s`` is drawn from
``numpy.random.SeedSequence([s, i])`` (:mod:`sirf_fbsem.simulation.dataset`), so its identity is the
pair ``(s, i)``: two sets share a phantom exactly when they share such a pair, whatever their
count levels. :func:`check_disjoint` refuses a confirmation set that shares a phantom with the
tuning set or with a model's training data, before any reconstruction runs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PhantomSet", "SetOverlapError", "check_disjoint", "phantom_set_of_manifests", "phantom_set_of_model"]


class SetOverlapError(ValueError):
    """A study's confirmation set shares phantoms with its tuning or training set."""


@dataclass(frozen=True)
class PhantomSet:
    """One role's phantoms: ``role`` ("confirmation", "tuning", "training of MODEL"), where they came
    from (``sources``: directories or a model file) and their ``(seed, index)`` pairs; ``pairs`` is
    None when the source does not record them (a model trained before 0.5 records no seeds)."""

    role: str
    sources: tuple[str, ...]
    pairs: frozenset[tuple[int, int]] | None

    @property
    def seeds(self) -> list[int] | None:
        """The base seeds, sorted (None: not recorded)."""
        return None if self.pairs is None else sorted({s for s, _ in self.pairs})

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON record (role, sources, base seeds, number of phantoms)."""
        return {"role": self.role, "sources": list(self.sources), "seeds": self.seeds,
                "num_phantoms": None if self.pairs is None else len(self.pairs)}


def phantom_set_of_manifests(role: str, datasets: Sequence[tuple[str, Mapping[str, Any], int]]) -> PhantomSet:
    """The phantoms of samples ``0 .. n-1`` of each ``(directory, manifest, n)`` in ``datasets``
    (the manifest's base ``seed``, as ``sirf-fbsem simulate`` writes it); pairs None if a manifest
    records no seed."""
    pairs: set[tuple[int, int]] = set()
    for _, manifest, n in datasets:
        if manifest.get("seed") is None:
            return PhantomSet(role, tuple(d for d, _, _ in datasets), None)
        pairs |= {(int(manifest["seed"]), i) for i in range(int(n))}
    return PhantomSet(role, tuple(d for d, _, _ in datasets), frozenset(pairs))


def phantom_set_of_model(name: str, path: str, metadata: Mapping[str, Any]) -> PhantomSet:
    """The training set recorded in a model's metadata (``training_data``, written by ``sirf-fbsem
    train``: ``{seed, indices}``, or a list of them for several datasets); pairs None if not recorded."""
    rec = metadata.get("training_data")
    records = rec if isinstance(rec, list) else [rec]
    pairs: set[tuple[int, int]] = set()
    for r in records:
        if not isinstance(r, Mapping) or r.get("seed") is None or r.get("indices") is None:
            return PhantomSet(f"training of {name}", (str(path),), None)
        pairs |= {(int(r["seed"]), int(i)) for i in r["indices"]}
    return PhantomSet(f"training of {name}", (str(path),), frozenset(pairs))


def check_disjoint(confirmation: PhantomSet, others: Sequence[PhantomSet]) -> None:
    """Raise :class:`SetOverlapError` if ``confirmation`` shares a phantom with any of ``others``.

    The message names both sets, their sources and the shared base seeds. Sets that record no
    seeds cannot be checked and pass (the evaluation JSON records them as unknown).
    """
    if confirmation.pairs is None:
        return
    for other in others:
        if other.pairs is None:
            continue
        shared = confirmation.pairs & other.pairs
        if shared:
            seeds = sorted({s for s, _ in shared})
            raise SetOverlapError(
                f"the {confirmation.role} set ({', '.join(confirmation.sources)}) shares {len(shared)} phantom(s) "
                f"(base seed(s) {seeds}) with the {other.role} set ({', '.join(other.sources)}): a confirmation "
                "set must be disjoint from every set a choice was made on; simulate it with another --seed"
            )
