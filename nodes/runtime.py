"""Running engine steps the way ComfyUI expects: memory manager, batches, progress, interrupts, out of memory.

``ComfyStepRunner`` is the engine's ``StepRunner`` for ComfyUI:

* it loads the networks a step runs (and only those) with
  ``model_management.load_models_gpu``, asking for the working memory of one
  image's tile on top, so ComfyUI evicts or partly unloads other models as
  needed and keeps ours resident afterwards;
* it processes as many images of a batch at once as the free memory holds
  (as ComfyUI's VAE does) and leaves results on
  ``model_management.intermediate_device()`` between chunks and nodes;
* out of memory (``model_management.OOM_EXCEPTION``, as ComfyUI's upscale
  node catches it): it processes fewer images at once, then halves the tile,
  down to the step's smallest tile, then raises an error that names the node,
  the tile reached and what to try.

Each tile reports to a ``comfy.utils.ProgressBar``; ComfyUI's interrupt is
checked between tiles (``throw_exception_if_processing_interrupted`` raises
ComfyUI's own exception, so an interrupt is shown as one, not as an error).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import comfy.model_management as model_management
import comfy.utils
import torch

from ..fidesr_core.step_runner import Attempt, StepCall, StepRunner
from .errors import node_error
from .model_handle import FiDeSRModelHandle

__all__ = [
    "TileProgress",
    "interrupt_check",
    "check_interrupted",
    "ComfyStepRunner",
    "is_out_of_memory",
    "halved_tile",
    "smaller_attempt",
]

logger = logging.getLogger("FiDeSR")
T = TypeVar("T")


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


def is_out_of_memory(error: BaseException) -> bool:
    """ComfyUI's ``OOM_EXCEPTION``; also a RuntimeError saying so (MPS and some other backends)."""
    oom = model_management.OOM_EXCEPTION
    if oom is not Exception and isinstance(error, oom):  # ComfyUI falls back to Exception without CUDA support
        return True
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def halved_tile(tile_size: int, full_size: int) -> int:
    """Half the tile, a multiple of 8; a tile of 0 ("in one piece") counts as ``full_size``."""
    current = tile_size if tile_size > 0 else full_size
    return (current // 2) // 8 * 8


def smaller_attempt(call: StepCall, attempt: Attempt) -> Attempt | None:
    """After running out of memory: fewer images at once, else a smaller tile, else None."""
    if attempt.images_per_chunk > 1:
        return Attempt(attempt.device, attempt.tile_size, max(1, attempt.images_per_chunk // 2))
    if call.tiled:
        tile = halved_tile(attempt.tile_size, call.full_size)
        if tile >= call.min_tile:
            return Attempt(attempt.device, tile, 1)
    return None


def _out_of_memory_advice(call: StepCall, attempt: Attempt) -> str:
    reached = f"with tile_size {attempt.tile_size} ({call.tile_unit}) and " if call.tiled else "with "
    return (
        f"out of memory {reached}one image at a time. Free memory (Unload Models in ComfyUI's menu, close "
        "other programs), start ComfyUI with --lowvram, use a lower precision in Load FiDeSR Model, or give a "
        "smaller input image"
    )


class ComfyStepRunner(StepRunner):
    """Runs the engine's steps for the node ``node`` through ComfyUI's memory manager."""

    def __init__(self, handle: FiDeSRModelHandle | None, node: str) -> None:
        self.handle = handle
        self.node = node

    def rest(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(model_management.intermediate_device())

    def _device_after_loading(self, call: StepCall, per_image: int) -> torch.device:
        if not call.networks:  # the injections: a few latent-sized maps, no weights
            return model_management.get_torch_device()
        if self.handle is None:
            raise RuntimeError(f"step {call.step} runs networks but the runner has no model")
        patchers = [self.handle.patchers[name] for name in call.networks]
        whole = not all(self.handle.partial_load[name] for name in call.networks)
        model_management.load_models_gpu(patchers, memory_required=per_image, force_full_load=whole)
        return patchers[0].load_device

    def run(self, call: StepCall, work: Callable[[Attempt], T]) -> T:
        per_image = max(1, call.working_bytes(call.tile_size))
        device = self._device_after_loading(call, per_image)
        fits = int(model_management.get_free_memory(device) // per_image)
        attempt = Attempt(device, call.tile_size, max(1, min(call.batch_size, fits)))
        while True:
            check_interrupted()
            try:
                return work(attempt)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                smaller = smaller_attempt(call, attempt)
                if smaller is None:
                    raise node_error(self.node, _out_of_memory_advice(call, attempt)) from error
            # Outside the except block, so the failed attempt's frames (and tensors) are released.
            logger.warning(
                "%s: out of memory with tile_size %d and %d image(s) at a time; retrying with tile_size %d and %d",
                self.node,
                attempt.tile_size,
                attempt.images_per_chunk,
                smaller.tile_size,
                smaller.images_per_chunk,
            )
            model_management.soft_empty_cache()
            attempt = smaller
