"""How a pipeline step gets a device, memory and a batch size: the seam between the steps and a memory manager.

Each step in ``pipeline`` describes itself as a ``StepCall`` (which networks it
runs, how large its batch and tile are, how much working memory one image
needs) and hands a ``work`` function to a ``StepRunner``.  The runner decides
where to compute, how many images to process at once and what to do when
memory runs out, then calls ``work(Attempt(...))``, possibly several times.

The base ``StepRunner`` runs once, on the device of the step's weights, with
the whole batch, and leaves results where they were computed (the CLI).  The
ComfyUI nodes use a runner that loads the networks through ComfyUI's memory
manager, sizes batches to free memory and halves the tile after running out
of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from .progress import ProgressCallback

__all__ = [
    "StepCall",
    "Attempt",
    "StepRunner",
    "working_memory_bytes",
    "run_in_chunks",
]

T = TypeVar("T")

# Rough peak activation memory per image pixel of a U-Net or VAE tile, per byte of dtype: only
# used to ask a memory manager for room and to size batches (an over-estimate unloads more).
_WORKING_BYTES_PER_PIXEL_PER_DTYPE_BYTE = 512


def working_memory_bytes(pixels: int, dtype: torch.dtype) -> int:
    """Memory to ask for while ``pixels`` image pixels are processed at once."""
    return int(pixels) * _WORKING_BYTES_PER_PIXEL_PER_DTYPE_BYTE * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class StepCall:
    """What a step needs from its runner."""

    step: str  # a step name of ``latent_state`` ("encode", "residual", ...)
    networks: tuple[str, ...]  # the model's networks the step runs ("vae", "unet", "lrrb"); () for none
    weights_device: torch.device  # where those weights (or the inputs, for no network) are now
    batch_size: int
    working_bytes: Callable[[int], int]  # working memory of ONE image at a tile size
    tile_size: int = 0  # asked for; 0 = in one piece
    tiled: bool = False  # whether a smaller tile is worth trying after running out of memory
    full_size: int = 0  # the longest side in tile units: what a tile of 0 covers
    min_tile: int = 0  # the smallest tile worth trying
    tile_unit: str = "pixels"  # for messages: "pixels" or "latent pixels"


@dataclass(frozen=True)
class Attempt:
    """How a runner asks ``work`` to run: where, with which tile, how many images at once."""

    device: torch.device
    tile_size: int
    images_per_chunk: int


class StepRunner:
    """Runs each step once, where its weights are, with the whole batch; results stay on that device."""

    def run(self, call: StepCall, work: Callable[[Attempt], T]) -> T:
        return work(Attempt(device=call.weights_device, tile_size=call.tile_size, images_per_chunk=call.batch_size))

    def rest(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where results wait between chunks and steps (the base runner leaves them where they are)."""
        return tensor


def run_in_chunks(
    batch_size: int,
    images_per_chunk: int,
    run_chunk: Callable[[slice, ProgressCallback | None], Sequence[torch.Tensor | None]],
    *,
    rest: Callable[[torch.Tensor], torch.Tensor],
    progress: ProgressCallback | None = None,
) -> list[torch.Tensor | None]:
    """``run_chunk`` on consecutive slices of the batch, each output joined along dim 0.

    ``run_chunk(part, chunk_progress)`` returns a fixed number of tensors (or
    Nones) for the images of ``part``.  Progress counts over the whole batch:
    chunk ``i`` of ``n`` reports ``(i · total + done, n · total)``.
    """
    size = max(1, min(images_per_chunk, batch_size))
    starts = range(0, batch_size, size)
    pieces: list[list[torch.Tensor | None]] = []
    for index, start in enumerate(starts):
        chunk_progress = None
        if progress is not None:

            def chunk_progress(done: int, total: int, index: int = index) -> None:
                progress(index * total + done, len(starts) * total)

        outputs = run_chunk(slice(start, start + size), chunk_progress)
        pieces.append([None if output is None else rest(output) for output in outputs])
    if len(pieces) == 1:
        return pieces[0]
    joined: list[torch.Tensor | None] = []
    for parts in zip(*pieces, strict=True):
        joined.append(None if parts[0] is None else torch.cat(parts, dim=0))  # type: ignore[arg-type]
    return joined
