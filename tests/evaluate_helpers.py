"""Helpers for the evaluation tests (``test_evaluate*.py``): tiny images on disk and quiet evaluate options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["flat_image", "quiet", "touch_images", "write_image"]


def write_image(path: Path, rgb: np.ndarray) -> Path:
    """Save 8-bit ``rgb`` ``[H, W, 3]`` in the format its suffix names (parent folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)
    return path


def flat_image(value: int, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    """A uniform grey image ``[H, W, 3]`` of ``value``."""
    return np.full((size[0], size[1], 3), value, dtype=np.uint8)


def touch_images(folder: Path, names: list[str]) -> None:
    """Mid-grey PNGs called ``names`` in ``folder``."""
    for name in names:
        write_image(folder / name, flat_image(128))


def quiet(**kwargs):
    """``evaluate_folders`` options without a progress bar or announcements, plus ``kwargs``."""
    return {"show_progress": False, "announce": lambda _line: None, **kwargs}
