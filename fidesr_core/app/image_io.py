"""Reading photos into tensors and writing PNGs atomically (CLI side of the engine)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..atomic_write import write_atomic
from ..errors import ImageInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DATASET_IMAGE_EXTENSIONS",
    "LoadedImage",
    "image_files_in",
    "collect_image_files",
    "load_image",
    "save_png_atomic",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp"})  # what the CLI upscales
# Training and evaluation sets also come as BMP or TIFF (PIL reads them all).
DATASET_IMAGE_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | {".bmp", ".tif", ".tiff"}


def image_files_in(
    folder: Path, *, extensions: frozenset[str] = IMAGE_EXTENSIONS, recursive: bool = False
) -> list[Path]:
    """The image files in ``folder`` (and below it if ``recursive``), sorted; hidden files such as
    macOS's ``._name.png`` copies are skipped."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in candidates
        if path.suffix.lower() in extensions and not path.name.startswith(".") and path.is_file()
    )


def collect_image_files(inputs: Iterable[str | os.PathLike], *, recursive: bool = False) -> list[Path]:
    """Files as given plus the PNG/JPEG/WebP files of given folders, in order, without repeats.

    Raises ``ImageInputError`` for a missing path or a folder without images.
    """
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images = image_files_in(path, recursive=recursive)
            if not images:
                raise ImageInputError(f"{path}: folder holds no PNG, JPEG or WebP files")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise ImageInputError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class LoadedImage:
    rgb: torch.Tensor  # [1, 3, H, W] float32 in [0, 1]
    alpha: torch.Tensor | None  # [1, 1, H, W] float32 in [0, 1], or None when opaque


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype in (np.uint16, np.int32, np.int16):  # 16-bit PNG modes I;16 / I
        return np.clip(array.astype(np.float32) / 65535.0, 0.0, 1.0)
    if array.dtype == np.float32:
        return np.clip(array, 0.0, 1.0)
    if array.dtype == bool:
        return array.astype(np.float32)
    raise ImageInputError(f"unsupported pixel type {array.dtype}")


def _planes(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """``(rgb [H, W, 3], alpha [H, W] or None)`` as float32 in [0, 1]."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit greyscale
        grey = _to_unit_float(np.asarray(image))
        return np.repeat(grey[..., None], 3, axis=2), None
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    converted = image.convert("RGBA" if has_alpha else "RGB")
    array = _to_unit_float(np.asarray(converted))
    if not has_alpha:
        return array, None
    alpha = array[..., 3]
    return array[..., :3], (None if alpha.min() >= 1.0 else alpha)


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Read PNG/JPEG/WebP (any mode: grey, palette, RGBA, 16-bit) honouring EXIF orientation."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb, alpha = _planes(image)
    except FileNotFoundError as error:
        raise ImageInputError(f"{path}: no such file") from error
    except UnidentifiedImageError as error:
        raise ImageInputError(f"{path}: not an image this program can read (PNG, JPEG or WebP expected)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"{path}: the image data is damaged or truncated ({error})") from error
    rgb_tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    alpha_tensor = None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha))[None, None]
    return LoadedImage(rgb=rgb_tensor, alpha=alpha_tensor)


# Rows converted to 8 bits at a time: float temporaries of a strip, not of the whole image (a 4096² float
# image is 200 MB a copy; the 8-bit result is a quarter of one).
_PNG_STRIP_PIXELS = 1 << 20


def _to_uint8_hwc(planes: list[torch.Tensor]) -> np.ndarray:
    """``[C_i, H, W]`` planes in [0, 1] -> one ``[H, W, ΣC_i]`` uint8 array, rounded, a strip of rows at a time."""
    height, width = planes[0].shape[-2:]
    array = np.empty((height, width, sum(p.shape[0] for p in planes)), dtype=np.uint8)
    step = max(1, _PNG_STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        strip = torch.cat([p[:, top : top + step].detach().float().cpu() for p in planes], dim=0)
        quantised = strip.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        array[top : top + step] = quantised.permute(1, 2, 0).numpy()
    return array


def save_png_atomic(path: str | os.PathLike, rgb: torch.Tensor, alpha: torch.Tensor | None = None) -> None:
    """Write ``rgb`` ``[3, H, W]`` (and optional ``alpha`` ``[1, H, W]``) in [0, 1] as an 8-bit PNG."""
    planes = [rgb] if alpha is None else [rgb, alpha]
    image = Image.fromarray(_to_uint8_hwc(planes))  # RGB or RGBA from the last axis
    write_atomic(path, lambda temp: image.save(temp, format="PNG"))
