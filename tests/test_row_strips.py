"""Full-resolution filters in strips of rows give the whole-image result (detail map, LRRB)."""

from __future__ import annotations

import pytest
import torch

from fidesr_core.networks.lrrb import LRRB
from fidesr_core.ops import detail_map as detail_map_module
from fidesr_core.ops.detail_map import box_blur3, detail_map
from fidesr_core.ops.restoration import LRRB_HALO
from fidesr_core.ops.row_strips import by_row_strips


def _three_blurs(x: torch.Tensor) -> torch.Tensor:
    return box_blur3(box_blur3(box_blur3(x)))  # each blur reaches one row and spoils one edge row


def test_strips_equal_the_whole_map_with_enough_halo() -> None:
    x = torch.rand(2, 1, 50, 17, generator=torch.Generator().manual_seed(0))
    whole = _three_blurs(x)
    for rows in (1, 4, 7, 50):
        strips = by_row_strips(_three_blurs, x, halo=3, elements=2 * 17 * rows)
        torch.testing.assert_close(strips, whole, atol=1e-6, rtol=0)
    too_little = by_row_strips(_three_blurs, x, halo=2, elements=2 * 17 * 7)
    assert (too_little - whole).abs().max() > 1e-4  # the halo matters: the check can fail


def test_detail_map_in_strips_equals_the_whole_map(monkeypatch: pytest.MonkeyPatch) -> None:
    image = torch.rand(2, 3, 61, 45, generator=torch.Generator().manual_seed(1)) * 2 - 1
    monkeypatch.setattr(detail_map_module, "by_row_strips", lambda fn, x, halo, elements=0: fn(x))
    whole = detail_map(image)
    monkeypatch.setattr(
        detail_map_module, "by_row_strips", lambda fn, x, halo: by_row_strips(fn, x, halo=halo, elements=45 * 5)
    )
    torch.testing.assert_close(detail_map(image), whole, atol=1e-5, rtol=0)


@torch.no_grad()
def test_lrrb_in_strips_equals_the_whole_latent() -> None:
    torch.manual_seed(2)
    lrrb = LRRB()
    for parameter in lrrb.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(1, 8, 70, 23)
    whole = lrrb(x)
    strips = by_row_strips(lrrb, x, halo=LRRB_HALO, elements=8 * 23 * 5)
    torch.testing.assert_close(strips, whole, atol=1e-5 * whole.abs().max().item(), rtol=0)
