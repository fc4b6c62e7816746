"""The PNG encode converts a strip of rows at a time: the same bytes as converting the whole image at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fidesr_core.app import image_io
from fidesr_core.app.image_io import save_png_atomic


@pytest.mark.parametrize("with_alpha", [False, True])
def test_strips_give_the_whole_image_rounding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_alpha: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 37, 23, generator=generator) * 1.2 - 0.1  # some values outside [0, 1]
    alpha = torch.rand(1, 37, 23, generator=generator) if with_alpha else None
    monkeypatch.setattr(image_io, "_PNG_STRIP_PIXELS", 5 * 23)  # strips of 5 rows, the last one short
    save_png_atomic(tmp_path / "out.png", rgb, alpha)
    planes = rgb if alpha is None else torch.cat([rgb, alpha])
    expected = (planes.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with Image.open(tmp_path / "out.png") as written:
        assert written.mode == ("RGBA" if with_alpha else "RGB")
        assert np.array_equal(np.asarray(written), expected)
