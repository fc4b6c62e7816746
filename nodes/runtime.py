"""Running engine steps the way ComfyUI expects: devices, memory, progress, interrupts, OOM.

* The model rests on ComfyUI's offload device and moves to its torch device
  only while a node runs, after ``model_management.free_memory`` has made room
  for the weights plus an estimate of the working memory.
* Each tile reports to a ``comfy.utils.ProgressBar``; ComfyUI's interrupt is
  checked between tiles (``throw_exception_if_processing_interrupted`` raises
  ComfyUI's own exception, so an interrupt is shown as one, not as an error).
* Out of memory: the step is retried once with the tile halved, and the retry
  is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import comfy.model_management as model_management
import comfy.utils
import torch

from .model_handle import FiDeSRModelHandle

__all__ = [
    "TileProgress",
    "interrupt_check",
    "check_interrupted",
    "working_memory_bytes",
    "model_on_device",
    "lrrb_on_device",
    "is_out_of_memory",
    "halved_tile",
    "retry_with_smaller_tile",
]

logger = logging.getLogger("FiDeSR")
T = TypeVar("T")

# Rough peak activation memory per output pixel of a U-Net or VAE tile, per byte of dtype;
# only used to ask ComfyUI to make room (an over-estimate unloads more of its models).
_WORKING_BYTES_PER_PIXEL_PER_DTYPE_BYTE = 512
_MIN_TILE = 8


class TileProgress:
    """Engine ``progress(done, total)`` callback feeding one ComfyUI progress bar."""

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    model_management.throw_exception_if_processing_interrupted()


def interrupt_check() -> bool:
    """Engine ``should_cancel``: raises ComfyUI's interrupt itself, so it never needs to return True."""
    check_interrupted()
    return False


def working_memory_bytes(pixels: int, dtype: torch.dtype) -> int:
    """Memory to ask for while ``pixels`` image-space pixels (batch included) are processed at once."""
    return int(pixels) * _WORKING_BYTES_PER_PIXEL_PER_DTYPE_BYTE * torch.empty((), dtype=dtype).element_size()


def _on_device(module: torch.nn.Module, device: torch.device) -> bool:
    parameter = next(module.parameters(), None)
    return parameter is None or parameter.device == device


@contextmanager
def model_on_device(handle: FiDeSRModelHandle, working_bytes: int) -> Iterator[FiDeSRModelHandle]:
    """Move the model to ComfyUI's torch device for the duration, then back to the offload device.

    Nested uses (one node running several steps) move it only once.
    """
    device = handle.load_device
    needed = working_bytes
    if not _on_device(handle.model.unet, device):
        needed += handle.model.memory_bytes()
    model_management.free_memory(needed, device)
    if handle.active_users == 0:
        handle.model.to(device)
    handle.active_users += 1
    try:
        yield handle
    finally:
        handle.active_users -= 1
        if handle.active_users == 0 and handle.offload_device != device:
            handle.model.to(handle.offload_device)
            model_management.soft_empty_cache()


@contextmanager
def lrrb_on_device(handle: FiDeSRModelHandle) -> Iterator[torch.nn.Module]:
    """Only the small LRRB needs the torch device for the refinement step."""
    lrrb = handle.model.lrrb
    resting = next(lrrb.parameters()).device
    lrrb.to(handle.load_device)
    try:
        yield lrrb
    finally:
        if handle.active_users == 0:
            lrrb.to(resting)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA/ROCm raise ``torch.OutOfMemoryError``; MPS and some backends a RuntimeError saying so."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def halved_tile(tile_size: int, full_size: int) -> int:
    """Half the tile (a multiple of 8, at least 8); a tile of 0 ("no tiling") counts as ``full_size``."""
    current = tile_size if tile_size > 0 else full_size
    return max(_MIN_TILE, (current // 2) // 8 * 8)


def retry_with_smaller_tile(node: str, run: Callable[[int], T], tile_size: int, *, full_size: int) -> T:
    """``run(tile_size)``; on out-of-memory, free the cache and ``run`` once more with the tile halved."""
    try:
        return run(tile_size)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        # Leave the except block first so the failed attempt's frames (and tensors) are released.
    smaller = halved_tile(tile_size, full_size)
    logger.warning("%s: out of memory with tile_size %d; retrying once with tile_size %d", node, tile_size, smaller)
    model_management.soft_empty_cache()
    return run(smaller)
