"""Where and how the stages of an upscale run: device, images at a time, tile, progress, cancellation, out of memory.

Every stage of ``pipeline`` goes through ``run_stage``: it runs the stage's work over the batch in chunks of
as many images as the ``Runtime`` allows, and after running out of memory tries again with fewer images, then
with half the tile, down to the stage's smallest tile, before raising ``OutOfMemory``.  The ComfyUI nodes
subclass ``Runtime`` to load networks through ComfyUI's memory manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import OutOfMemory
from .progress import CancelCheck, ProgressCallback, StageProgress, check_cancelled
from .tiled_vae.budget import free_memory_bytes

# The stages of an upscale, in order; progress, errors, the CLI, benchmarks and the nodes name them so.
STAGES: tuple[str, ...] = ("encode", "residual", "refine", "lf", "hf", "decode")
logger = logging.getLogger(__name__)

# Rough peak activation memory per image pixel of a tile, per dtype byte: only to ask for room and size batches.
_WORKING_BYTES_PER_PIXEL_PER_DTYPE_BYTE = 512


def working_memory_bytes(pixels: int, dtype: torch.dtype) -> int:
    """Memory to ask for while ``pixels`` image pixels are processed at once."""
    return int(pixels) * _WORKING_BYTES_PER_PIXEL_PER_DTYPE_BYTE * torch.empty((), dtype=dtype).element_size()


@dataclass
class Runtime:
    """Runs each stage where its weights are, with the whole batch; results stay on that device."""

    progress: StageProgress | None = None
    should_cancel: CancelCheck | None = None
    advice: str = "free memory, use a lower precision, a smaller upscale factor or a smaller image"

    def device(self, networks: Sequence[str], weights_device: torch.device, working_bytes: int) -> torch.device:
        """Where a stage running ``networks`` ("unet", "vae", "lrrb"; none for the injections) computes."""
        return weights_device

    def images_at_once(self, device: torch.device, working_bytes: int, batch: int) -> int:
        return batch

    def rest(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where results wait between chunks and stages."""
        return tensor

    def free_memory(self, device: torch.device) -> int | None:
        """Bytes still free on ``device`` (None: unknown), for what may wait there (the tiled VAE's maps)."""
        return free_memory_bytes(device)

    def tile_progress(self, stage: str) -> ProgressCallback | None:
        progress = self.progress
        return None if progress is None else lambda done, total: progress(stage, done, total)

    def is_out_of_memory(self, error: BaseException) -> bool:
        if isinstance(error, MemoryError | torch.OutOfMemoryError):
            return True
        message = str(error).lower()
        return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)

    def after_out_of_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


ChunkWork = Callable[[slice, int, torch.device, ProgressCallback | None], Sequence[torch.Tensor | None]]


def run_stage(
    runtime: Runtime,
    stage: str,
    work: ChunkWork,
    *,
    batch: int,
    networks: Sequence[str],
    weights_device: torch.device,
    working_bytes: Callable[[int], int],
    tile: int = 0,
    min_tile: int = 0,
    full_size: int = 0,
    tile_unit: str = "pixels",
) -> list[torch.Tensor | None]:
    """``work(images, tile, device, tile_progress)`` over the batch, again smaller after running out of memory.

    ``work`` returns a fixed number of tensors (or Nones) for its slice, joined along dim 0.  A stage is tiled
    when ``min_tile`` > 0: a tile of 0 ("in one piece") then counts as ``full_size``.
    """
    per_image = max(1, working_bytes(tile))
    device = runtime.device(networks, weights_device, per_image)
    at_once = max(1, min(batch, runtime.images_at_once(device, per_image, batch)))
    progress = runtime.tile_progress(stage)
    while True:
        check_cancelled(runtime.should_cancel)
        try:
            return _in_chunks(runtime, work, batch, at_once, tile, device, progress)
        except Exception as error:
            if not runtime.is_out_of_memory(error):
                raise
            side = full_size if tile == 0 or tile > full_size else tile  # what the tile covers now
            smaller_tile = side // 2 // 8 * 8
            if at_once == 1 and not (min_tile and smaller_tile >= min_tile):
                reached = f"tiles of {side} {tile_unit} and " if min_tile else ""
                raise OutOfMemory(
                    f"the {stage} stage ran out of memory with {reached}one image at a time; {runtime.advice}"
                ) from error
        # Outside the except block, so the failed attempt's frames (and tensors) are released.
        before = (tile, at_once)
        at_once, tile = (at_once // 2, tile) if at_once > 1 else (1, smaller_tile)
        logger.warning(
            "the %s stage ran out of memory with tile %d and %d image(s) at a time; retrying with tile %d and %d",
            stage,
            *before,
            tile,
            at_once,
        )
        runtime.after_out_of_memory()


def _in_chunks(
    runtime: Runtime,
    work: ChunkWork,
    batch: int,
    at_once: int,
    tile: int,
    device: torch.device,
    progress: ProgressCallback | None,
) -> list[torch.Tensor | None]:
    """Progress counts over the whole batch: chunk ``i`` of ``n`` reports ``(i · total + done, n · total)``."""
    starts = range(0, batch, at_once)
    pieces: list[Sequence[torch.Tensor | None]] = []
    for index, start in enumerate(starts):
        chunk_progress = None
        if progress is not None:

            def chunk_progress(done: int, total: int, index: int = index) -> None:
                progress(index * total + done, len(starts) * total)

        outputs = work(slice(start, start + at_once), tile, device, chunk_progress)
        pieces.append([None if output is None else runtime.rest(output) for output in outputs])
    if len(pieces) == 1:
        return list(pieces[0])
    return [None if parts[0] is None else torch.cat(parts) for parts in zip(*pieces, strict=True)]
