"""Running a flat program of tiled-VAE steps on a whole image, segment by segment (cut at every GroupNorm) and
tile by tile (docs/algorithm.md §2.10)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..progress import CancelCheck, ProgressCallback, check_cancelled
from .budget import MemoryBudget
from .group_norm import GroupStats
from .layers import Add, Box, Layer, MidBlockAttention, Norm, Save, Step
from .maps import MapStore, TensorMap, WholeMap
from .program import Program

MapShape = tuple[int, tuple[int, int]]  # channels, (height, width)
_WRITES_BEHIND = 1  # finished pieces that may wait to be written: what writing behind holds beyond a tile


def map_shapes(steps: list[Step], channels: int, size: tuple[int, int]) -> tuple[list[MapShape], dict[int, MapShape]]:
    """Whole-image channels and size of ``h`` before each step (and after the last one), and of each saved value."""
    shapes, saved = [(channels, size)], {}
    for step in steps:
        if isinstance(step, Save):
            saved[step.key] = shapes[-1]
        elif isinstance(step, Layer):
            channels, size = step.out_channels(channels), step.out_size(size)
        shapes.append((channels, size))
    return shapes, saved


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """``ceil(length / tile)`` near-equal spans that partition ``range(length)``."""
    count = -(-length // tile)
    return [(i * length // count, (i + 1) * length // count) for i in range(count)]


def _needs(segment: list[Step], first_size: list, saved_sizes: dict, wanted: dict[str | int, Box]) -> dict:
    """Walk a segment backwards from the regions ``wanted`` at its end (``"h"`` and saved keys) to those it reads;
    ``first_size[i]`` is the size of ``h`` before ``segment[i]``."""
    needed = dict(wanted)
    for step, size in zip(reversed(segment), reversed(first_size), strict=True):
        if isinstance(step, Add):
            skip = needed["h"] if step.shortcut is None else step.shortcut.needs(needed["h"], saved_sizes[step.key])
            needed[step.key] = skip.hull(needed.get(step.key))
        elif isinstance(step, Save):
            needed["h"] = needed["h"].hull(needed.pop(step.key, None))
        elif isinstance(step, Layer):
            needed["h"] = step.needs(needed["h"], size)
    return needed


def _run_steps(segment: list[Step], values: dict, stats: GroupStats | None) -> tuple[torch.Tensor, Box]:
    """Run a segment on one tile; ``values`` maps ``"h"`` and saved keys to (tensor, region)."""
    for step in segment:
        h, box = values["h"]
        if isinstance(step, Save):
            values[step.key] = values["h"]
        elif isinstance(step, Add):
            skip, skip_box = values.pop(step.key)
            if step.shortcut is not None:
                skip, skip_box = step.shortcut.run(skip, skip_box)
            common = box.intersect(skip_box)
            values["h"] = ((skip_box.crop(skip, common) + box.crop(h, common)) / step.scale, common)
        elif isinstance(step, Norm):
            values["h"] = (stats.normalize(h, step.module), box)
        else:
            values["h"] = step.run(h, box)
    return values["h"]


def _spare_maps(maps: dict, owned: set, consumed: set, plans: list, saved_sizes: dict) -> list[str | int]:
    """Saved maps that the new ``h`` may overwrite: they die in this segment, are no other key's map, and
    every tile reads them only inside its own core (before writing its core of ``h``)."""

    def read_inside_cores(key: int) -> bool:
        return all(
            core.scaled_to(*saved_sizes[key]).hull(need[key]) == core.scaled_to(*saved_sizes[key])
            for core, need in plans
        )

    return [
        key for key in consumed & owned if sum(m is maps[key] for m in maps.values()) == 1 and read_inside_cores(key)
    ]


def _core_side(segment: list[Step], maps: list[MapShape], latent: tuple, tile: int, budget: int) -> int:
    """The tile side (latent pixels) of one segment: ``tile``, or less where a tile of its widest map (of
    ``maps``: channels and size) would pass ``budget`` elements. The attention keeps ``tile``: its context,
    hence its result, depends on it."""
    if any(isinstance(step, MidBlockAttention) for step in segment):
        return tile
    per_latent_pixel = max(channels * h * w // (latent[0] * latent[1]) for channels, (h, w) in maps)
    return max(1, min(tile, math.isqrt(budget // max(1, per_latent_pixel))))


def _in_mode(function: Callable) -> Callable:
    """``function`` under the caller's inference and grad modes (torch keeps them per thread), for a worker."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(*args):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(*args)

    return run


@torch.no_grad()
def run_program(
    program: Program,
    source: torch.Tensor,
    tile: int,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
    store: MapStore | None = None,
) -> torch.Tensor:
    """Run ``program`` on ``source`` [B, C, H, W] in tiles whose latent-level cores are at most ``tile`` pixels;
    the result is on ``source``'s device.  ``store`` makes the whole-image maps (its peaks tell what the run held).
    A worker thread writes finished pieces behind (reading ahead would hold a second tile's inputs).
    """
    store = store or MapStore(MemoryBudget(), source.device, program.layout())
    steps, device = program.steps, source.device
    shapes, saved_shapes = map_shapes(steps, source.shape[1], tuple(source.shape[-2:]))
    sizes, saved_sizes = [size for _, size in shapes], {key: size for key, (_, size) in saved_shapes.items()}
    latent = sizes[-1] if sizes[-1][0] < sizes[0][0] else sizes[0]  # the encoder's output, the decoder's input
    item_bytes = source.shape[0] * source.element_size()
    bounds = [0] + [i for i, step in enumerate(steps) if isinstance(step, Norm)] + [len(steps)]
    grids = {}
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        touched = shapes[start : stop + 1] + [saved_shapes[s.key] for s in steps[start:stop] if isinstance(s, Add)]
        side = _core_side(steps[start:stop], touched, latent, tile, store.tile_bytes // item_bytes)
        grids[start] = [
            Box(*rows, *cols, *latent) for rows in _spans(latent[0], side) for cols in _spans(latent[1], side)
        ]
    maps: dict[str | int, WholeMap] = {"h": TensorMap(source, store.layout)}
    owned: set[str | int] = set()  # maps made here (the caller's tensor is never written)
    stats, total, done = None, sum(len(cores) for cores in grids.values()), 0
    with ThreadPoolExecutor(1, thread_name_prefix="tiled-vae") as writer:
        writes: deque[Future] = deque()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            segment, last, cores = steps[start:stop], stop == len(steps), grids[start]
            consumed = {step.key for step in segment if isinstance(step, Add)}
            saved = [step.key for step in segment if isinstance(step, Save) and step.key not in consumed]
            aliased = segment[-1].key if isinstance(segment[-1], Save) else None  # saved value is h itself
            next_stats = None if last else GroupStats(steps[stop].module.num_groups)
            plans = []
            for core in cores:
                wanted = {key: core.scaled_to(*saved_sizes[key]) for key in saved} | {"h": core.scaled_to(*sizes[stop])}
                plans.append((core, _needs(segment, sizes[start:stop], saved_sizes, wanted)))
            spare = [] if last else _spare_maps(maps, owned, consumed, plans, saved_sizes)
            new_maps: dict[str | int, WholeMap] = {}
            for core, needed in plans:
                check_cancelled(should_cancel)
                values = {key: (maps[key].read(box, device), box) for key, box in needed.items()}
                values["h"] = _run_steps(segment, values, stats)
                for key in ["h"] + [key for key in saved if key != aliased]:
                    value, box = values[key]
                    target = core.scaled_to(box.height, box.width)
                    piece = box.crop(value, target)
                    if key == "h" and next_stats is not None:
                        next_stats.add(piece)
                    if key not in new_maps:  # made on first use: a spare map of the right shape, else a new one
                        shape, dtype = (*piece.shape[:2], target.height, target.width), piece.dtype
                        fits = [
                            maps[k] for k in spare if key == "h" and (maps[k].shape, maps[k].dtype) == (shape, dtype)
                        ]
                        if fits:
                            new_maps[key] = fits[0]
                        else:
                            new_maps[key] = (
                                store.output_map(shape, dtype, device) if last else store.new_map(shape, dtype)
                            )
                    writes.append(writer.submit(_in_mode(new_maps[key].write), target, piece))
                    while len(writes) > _WRITES_BEHIND:
                        writes.popleft().result()
                del values, value, piece  # the tile being written is held by its write alone
                done += 1
                if progress is not None:
                    progress(done, total)
            while writes:  # the next segment reads what this one wrote
                writes.popleft().result()
            if aliased is not None:
                new_maps[aliased] = new_maps["h"]
            for key in consumed:
                del maps[key]
            maps.update(new_maps)
            owned = (owned - consumed) | set(new_maps)
            stats = next_stats
    return maps["h"].tensor
