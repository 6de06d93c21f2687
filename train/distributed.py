"""Multi-process training under ``torchrun``: who this process is, the process group, shards.

``torchrun --nproc-per-node=N -m train fit`` starts N copies of the CLI with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`process_group` turns them into a
process group (gloo on the CPU, NCCL on CUDA with one GPU per process, ``cuda:LOCAL_RANK``) for
the length of a run; without them it does nothing, so a plain ``python -m train fit`` runs as
before. The engine wraps the model in ``DistributedDataParallel`` and shards each epoch with
:meth:`DistributedContext.shard`; the pipeline lets the main process (rank 0) alone talk to
MLflow and write checkpoints. Other loaders (a ``DistributedSampler``) ask :func:`current`.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from train.device import Placement

#: The variables ``torchrun`` sets for each process it starts.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the ``world_size`` processes training one model."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that logs to MLflow, writes checkpoints and prints results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def shard_size(self, n: int) -> int:
        """Items :meth:`shard` gives each process out of ``n``."""
        return -(-n // self.world_size)

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This process's part of ``order`` (a permutation every process drew alike).

        Every ``world_size``-th item from ``rank``, so the parts are disjoint and together cover
        ``order``. When ``world_size`` does not divide its length, the first items are appended
        again so every process takes the same number of steps (DDP's gradient averaging waits
        for all of them each step): at most ``world_size - 1`` items are seen twice an epoch.
        """
        if self.world_size == 1:
            return order
        total = self.shard_size(len(order)) * self.world_size
        repeats = -(-total // max(len(order), 1))
        padded = order.repeat(repeats)[:total] if len(order) else order
        return padded[self.rank :: self.world_size]

    def split(self, n: int) -> torch.Tensor:
        """Indices ``0..n-1`` this process evaluates: disjoint, covering, no repeats."""
        return torch.arange(self.rank, n, self.world_size)

    def seed_epoch(self, seed: int, epoch: int) -> torch.Generator:
        """Seed torch's global RNG (dropout) for ``epoch`` on this process and return the CPU
        generator of its augmentation: both from ``(seed, epoch, rank)``, so ranks differ.

        Derived rather than carried along, so a resumed run (whose checkpoint holds the main
        process's RNG states only) draws what an uninterrupted one would.
        """
        state = np.random.SeedSequence([seed, epoch, self.rank]).generate_state(2, np.uint64)
        torch.manual_seed(int(state[0]) >> 1)
        return torch.Generator().manual_seed(int(state[1]) >> 1)

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """``values`` summed over all processes (the same numbers on every one)."""
        if not self.is_distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def from_main(self, value: T) -> T:
        """The main process's ``value``, on every process (decisions all ranks must share)."""
        if not self.is_distributed:
            return value
        box: list[T] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = DistributedContext()


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (or anything setting its variables) started this process."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def launch_context() -> DistributedContext:
    """What ``torchrun`` told this process, group or no group (``SINGLE`` without it)."""
    if not launched_by_torchrun():
        return SINGLE
    env = os.environ
    return DistributedContext(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))


def current() -> DistributedContext:
    """This process's context while a process group is up, else ``SINGLE``."""
    if not dist.is_initialized():
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


@contextmanager
def process_group(placement: Placement) -> Iterator[tuple[DistributedContext, Placement]]:
    """The process group of a ``torchrun`` launch for the length of a run, and where to train.

    Under ``torchrun``: gloo on the CPU; NCCL on CUDA, each process on ``cuda:LOCAL_RANK``.
    Otherwise ``(SINGLE, placement)`` and nothing else happens. The group is destroyed on exit,
    also after an error.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield current(), placement
        return
    device = placement.device
    if device.type == "cuda":
        device = torch.device("cuda", launch_context().local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield current(), Placement(device, placement.precision)
    finally:
        # A DistributedDataParallel wrapper sits in reference cycles that keep the group alive;
        # left to the collector at interpreter exit, gloo's teardown sometimes aborts the process
        # ("terminate called without an active exception"). Free them while all is still up.
        gc.collect()
        dist.destroy_process_group()
