"""The CLI as several processes: under ``torchrun`` or ``accelerate launch`` each rank takes a share.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
without them the CLI is one process and nothing here starts. The ranks talk over gloo (CPU
sockets) because they exchange only the plan and the results, never tensors; the GPUs stay free
for the upscaling.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# Ranks with very different shares wait for each other at the end; gloo's default (30 min) is too short.
_WAIT = datetime.timedelta(days=7)


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        return default


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        world_size = max(1, _environment_int("WORLD_SIZE", 1))
        rank = _environment_int("RANK", 0)
        if not 0 <= rank < world_size:
            rank = 0
        return cls(rank=rank, world_size=world_size, local_rank=_environment_int("LOCAL_RANK", rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self) -> None:
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "gloo", rank=self.rank, world_size=self.world_size, timeout=_WAIT, init_method="env://"
            )

    def stop(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (one process: ``value``)."""
        if not self.distributed:
            return value
        box: list[Any] = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def share(self, items: Sequence[T]) -> list[T]:
        """Every ``world_size``-th item from ``rank``: disjoint, together complete, the same on every restart."""
        return list(items[self.rank :: self.world_size])

    def device(self, requested: str) -> str:
        """``auto``/``cuda`` become this rank's GPU (``cuda:LOCAL_RANK``) when several ranks share a machine."""
        if not self.distributed or requested not in ("auto", "cuda") or not torch.cuda.is_available():
            return requested
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"
