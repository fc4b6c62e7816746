"""Apply a local filter to a full-resolution map a strip of rows at a time, with the same result.

``fn`` must be local: each output row depends on input rows at most ``halo`` away (its own padding's effect
included).  Each strip is computed with ``halo`` extra rows on both sides (fewer at the image's border) and
cropped back, so only a strip's temporaries exist at a time (a whole 3x3 convolution on a 4096² map builds a
600 MB column buffer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

STRIP_ELEMENTS = 1 << 20  # input elements per strip (rows × width × batch × channels)


def by_row_strips(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, halo: int, elements: int = STRIP_ELEMENTS
) -> torch.Tensor:
    """``fn(x)`` for ``x`` ``[B, C, H, W]`` (``fn`` keeps H and W), computed in strips of rows."""
    height = x.shape[-2]
    per_row = max(1, x[..., :1, :].numel())
    step = max(1, elements // per_row)
    if step >= height:
        return fn(x)
    pieces = []
    for top in range(0, height, step):
        bottom = min(top + step, height)
        low, high = max(0, top - halo), min(height, bottom + halo)
        pieces.append(fn(x[..., low:high, :])[..., top - low : top - low + bottom - top, :])
    return torch.cat(pieces, dim=-2)
