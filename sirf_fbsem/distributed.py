"""torch.distributed for FBSEM-Net: the launch context, deterministic sharding, small collectives.

The package runs under ``torchrun`` (``torch.distributed.run``): it reads the rank and
world size that torchrun puts in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and initialises the default process
group from ``env://``. CPU ranks use the ``gloo`` backend, CUDA ranks ``nccl`` (the
backend follows the device). A process started any other way, or by torchrun with one
process, is a single process and runs exactly as without this module.

Data parallelism over a global batch: a global batch of ``n`` samples (the same on
every rank, from the seeded epoch order) is split in contiguous shares whose sizes
differ by at most one (:func:`shard_batch`). Rank ``r`` scales its mean-reduced loss
by :func:`loss_weight` ``= n_r · W / n``; DistributedDataParallel averages gradients
over the ``W`` ranks, so

    (1/W) · Σ_r (n_r W / n) ∇L_r = Σ_r (n_r / n) ∇L_r = ∇L(global batch),

the gradient of one process on the whole batch (with equal shares the weight is 1).
A rank whose share is empty (a global batch smaller than W) runs one sample with
weight 0 so that every rank joins every gradient reduction.

Nothing here holds global state: :class:`DistContext` is a frozen value passed to
whoever needs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "SINGLE_PROCESS",
    "backend_for_device",
    "current_context",
    "elastic_restart_count",
    "init_distributed",
    "launched_by_torchrun",
    "local_device",
    "loss_weight",
    "shard_batch",
    "shard_items",
    "shutdown",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        backend: ``"gloo"``, ``"nccl"``, or ``None`` for a single process.
        owns_group: True when :func:`init_distributed` created the process group (and
            :func:`shutdown` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes checkpoints, logs and summaries, shows progress bars."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Device of the tensors of the collectives (nccl needs CUDA tensors)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks of a list of floats (float64; identical on every rank)."""
        if not self.is_distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0


#: the context of a process that is not part of a distributed job
SINGLE_PROCESS = DistContext()


# ---------------------------------------------------------------------------- launch
def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True when the environment carries a torchrun (or SLURM-with-torchrun) rank and world size."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


def elastic_restart_count(env: Mapping[str, str] | None = None) -> int:
    """How many times torchrun has restarted this job's workers (``TORCHELASTIC_RESTART_COUNT``, 0 when absent)."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def backend_for_device(device: str | torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: str | torch.device, local_rank: int) -> str:
    """The device of this rank: ``"cuda"`` (no index) becomes ``cuda:<local_rank>``; others are kept."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{local_rank}"
    return str(d)


def current_context() -> DistContext:
    """The context of an already initialised default process group, else :data:`SINGLE_PROCESS`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
        owns_group=False,
    )


def init_distributed(device: str | torch.device = "cpu", env: Mapping[str, str] | None = None) -> DistContext:
    """Join the job torchrun started (``env://``), with the backend of ``device``.

    A process not launched by torchrun, or a job of one process, gets
    :data:`SINGLE_PROCESS` and no process group. When a group already exists it is
    used as it is. CUDA ranks select ``cuda:<LOCAL_RANK>`` before joining.
    """
    env = os.environ if env is None else env
    if dist.is_available() and dist.is_initialized():
        return current_context()
    if not launched_by_torchrun(env) or int(env["WORLD_SIZE"]) <= 1:
        return SINGLE_PROCESS
    if not dist.is_available():  # pragma: no cover - torch builds without distributed
        raise RuntimeError("this torch build has no torch.distributed; it cannot run under torchrun")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    backend = backend_for_device(device)
    if backend == "nccl":
        torch.cuda.set_device(torch.device(local_device(device, local_rank)))
    dist.init_process_group(backend=backend, store=_attempt_store(env), rank=int(env["RANK"]),
                            world_size=int(env["WORLD_SIZE"]))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       backend=backend, owns_group=True)


def _attempt_store(env: Mapping[str, str]) -> dist.Store:
    """The ``env://`` rendezvous store (``MASTER_ADDR``/``MASTER_PORT``), with keys prefixed by the
    torchrun restart count.

    After torchrun restarts the workers (``--max-restarts``) they meet again in the same
    store; without a per-attempt prefix the new ranks read the addresses that the dead
    ones published and the gloo mesh fails to connect ("Connection refused").
    """
    from datetime import timedelta

    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    rank = int(env["RANK"])
    store = dist.TCPStore(
        host_name=env["MASTER_ADDR"],
        port=int(env["MASTER_PORT"]),
        world_size=int(env["WORLD_SIZE"]),
        is_master=not agent_store and rank == 0,  # torchrun's agent hosts the store, else rank 0
        timeout=timedelta(minutes=10),
        multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"sirf_fbsem/attempt_{elastic_restart_count(env)}", store)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if ``ctx`` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- sharding
def shard_batch(indices: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous share of a global batch; share sizes differ by at most one.

    The first ``len(indices) % world_size`` ranks get one sample more. Concatenating the
    shares in rank order gives ``indices`` back.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    n = len(indices)
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)
    return list(indices[lo:hi])


def shard_items(n: int, rank: int, world_size: int) -> list[int]:
    """Items ``0 .. n-1`` of rank ``rank``, round robin (rank, rank + W, ...): each item on exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return list(range(rank, n, world_size))


def loss_weight(n_local: int, n_global: int, world_size: int) -> float:
    """Scale of a rank's mean-reduced loss so that DDP's gradient average is the global-batch gradient."""
    if n_global < 1:
        raise ValueError(f"a global batch has at least one sample, got {n_global}")
    return n_local * world_size / n_global

