"""The CLI as several processes: under ``torchrun`` or ``accelerate launch`` each rank takes a share; the ranks
join over gloo (accelerate's ``PartialState``) and exchange only the plan and results, never tensors."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..errors import SettingsError

if TYPE_CHECKING:
    from accelerate import PartialState

# Ranks with very different shares wait for each other at the end; gloo's default (30 min) is too short.
_WAIT = datetime.timedelta(days=7)


# accelerate's own test for a launcher: PartialState(backend="gloo") without one fails in get_world_size (1.16).
def _launched() -> bool:
    return int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1


@contextmanager
def joined_ranks() -> Iterator[PartialState]:
    """The ranks, joined for the block; when it ends the process group is gone, its gloo threads ended."""
    from accelerate import PartialState

    if not _launched():  # one process: nothing distributed starts (and cpu=True would stick to the singleton)
        yield PartialState()
        return
    # torch.distributed.nn (torch._dynamo imports it) binds the default group when first imported: imported after
    # the group started, it kept gloo's threads alive past destroy_process_group and the rank aborted at shutdown.
    import torch.distributed.nn  # noqa: F401

    try:
        state = PartialState(cpu=True, backend="gloo", timeout=_WAIT)
    except (RuntimeError, ValueError) as error:  # the launcher's variables are there, the others are not
        raise SettingsError(f"cannot join the other ranks ({error})") from None
    try:
        yield state
    finally:
        state.destroy_process_group()


# PartialState(cpu=True), the way to gloo, reports the CPU as every rank's device: the GPU is picked here.
def rank_device(state: PartialState, requested: str) -> str:
    """``auto``/``cuda`` become this rank's GPU (``cuda:LOCAL_RANK``) when several ranks share a machine."""
    if state.num_processes == 1 or requested not in ("auto", "cuda") or not torch.cuda.is_available():
        return requested
    return f"cuda:{state.local_process_index % torch.cuda.device_count()}"
