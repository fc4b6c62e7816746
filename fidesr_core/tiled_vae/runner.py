"""Running a flat program of tiled-VAE steps on a whole image, segment by segment and tile by tile.

Internal to ``fidesr_core.tiled_vae.codec`` (whose docstring explains the method): the program is cut
into segments at every GroupNorm; for each tile the runner walks a segment backwards to find the
regions it reads, runs it, writes the tile's core into new whole-image maps and adds the core's
statistics for the next GroupNorm.
"""

from __future__ import annotations

import torch

from ..progress import CancelCheck, ProgressCallback, check_cancelled
from .group_norm import GroupStats
from .program import Program
from .steps import Add, Box, Layer, Norm, Save, Step

__all__ = ["map_sizes", "run_program"]


def map_sizes(steps: list[Step], size: tuple[int, int]) -> tuple[list[tuple[int, int]], dict[int, tuple[int, int]]]:
    """Whole-image size of ``h`` before each step (and after the last one), and of each saved value."""
    sizes, saved = [size], {}
    for step in steps:
        if isinstance(step, Save):
            saved[step.key] = sizes[-1]
        sizes.append(step.out_size(sizes[-1]) if isinstance(step, Layer) else sizes[-1])
    return sizes, saved


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """``ceil(length / tile)`` near-equal spans that partition ``range(length)``."""
    count = -(-length // tile)
    return [(i * length // count, (i + 1) * length // count) for i in range(count)]


def _needs(segment: list[Step], first_size: list, saved_sizes: dict, wanted: dict[str | int, Box]) -> dict:
    """Walk a segment backwards from the regions ``wanted`` at its end (``"h"`` and saved keys) to those it reads.

    ``first_size[i]`` is the size of ``h`` before ``segment[i]``.
    """
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


def _store(maps: dict, key: str | int, piece: torch.Tensor, target: Box, reuse: list, device: torch.device) -> None:
    """Write a tile's core ``piece`` (covering ``target``) into ``maps[key]``, made on first use (from
    ``reuse`` when one of those maps has the right shape)."""
    if key not in maps:
        shape = (*piece.shape[:2], target.height, target.width)
        fits = [m for m in reuse if m.shape == shape and m.dtype == piece.dtype]
        maps[key] = fits[0] if fits else piece.new_empty(shape, device=device)
    maps[key][..., target.top : target.bottom, target.left : target.right] = piece


def run_program(
    program: Program,
    source: torch.Tensor,
    tile: int,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
) -> torch.Tensor:
    """Run ``program`` on ``source`` [B, C, H, W] in tiles whose latent-level cores are at most ``tile`` pixels."""
    steps, device = program.steps, source.device
    storage = device if device.type == "cpu" else torch.device("cpu")  # where whole-image maps wait
    sizes, saved_sizes = map_sizes(steps, tuple(source.shape[-2:]))
    latent = sizes[-1] if sizes[-1][0] < sizes[0][0] else sizes[0]  # the encoder's output, the decoder's input
    cores = [Box(*rows, *cols, *latent) for rows in _spans(latent[0], tile) for cols in _spans(latent[1], tile)]
    bounds = [0] + [i for i, step in enumerate(steps) if isinstance(step, Norm)] + [len(steps)]
    maps: dict[str | int, torch.Tensor] = {"h": source}
    owned: set[str | int] = set()  # maps allocated here (the caller's tensor is never written)
    stats, total, done = None, (len(bounds) - 1) * len(cores), 0
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        segment, last = steps[start:stop], stop == len(steps)
        consumed = {step.key for step in segment if isinstance(step, Add)}
        saved = [step.key for step in segment if isinstance(step, Save) and step.key not in consumed]
        aliased = segment[-1].key if isinstance(segment[-1], Save) else None  # saved value is h itself
        next_stats = None if last else GroupStats(steps[stop].module.num_groups)
        plans = []
        for core in cores:
            wanted = {key: core.scaled_to(*saved_sizes[key]) for key in saved} | {"h": core.scaled_to(*sizes[stop])}
            plans.append((core, _needs(segment, sizes[start:stop], saved_sizes, wanted)))
        spare = [] if last else _spare_maps(maps, owned, consumed, plans, saved_sizes)
        new_maps: dict[str | int, torch.Tensor] = {}
        for core, needed in plans:
            check_cancelled(should_cancel)
            values = {
                key: (maps[key][..., b.top : b.bottom, b.left : b.right].to(device), b) for key, b in needed.items()
            }
            values["h"] = _run_steps(segment, values, stats)
            for key in ["h"] + [key for key in saved if key != aliased]:
                value, box = values[key]
                target = core.scaled_to(box.height, box.width)
                piece = box.crop(value, target)
                if key == "h" and next_stats is not None:
                    next_stats.add(piece)
                reuse = [maps[k] for k in spare] if key == "h" else []
                _store(new_maps, key, piece, target, reuse, device if last else storage)
            done += 1
            if progress is not None:
                progress(done, total)
        if aliased is not None:
            new_maps[aliased] = new_maps["h"]
        for key in consumed:
            del maps[key]
        maps.update(new_maps)
        owned = (owned - consumed) | set(new_maps)
        stats = next_stats
    return maps["h"]
