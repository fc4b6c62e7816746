"""Reading photos into tensors and writing PNGs atomically (CLI side of the engine).  Inputs are still PNG, JPEG
or WebP files, by extension; animations and images over the decompression-bomb limit are refused before decoding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..atomic_write import write_atomic
from ..errors import ImageInputError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp"})  # what the CLI upscales
# Training and evaluation sets also come as BMP or TIFF (PIL reads them all).
DATASET_IMAGE_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | {".bmp", ".tif", ".tiff"}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every complete PNG ends with
_ANIMATED_FORMATS = frozenset({"PNG", "WEBP", "GIF"})
_EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image a quarter turn


def image_files_in(
    folder: Path, *, extensions: frozenset[str] = IMAGE_EXTENSIONS, recursive: bool = False
) -> list[Path]:
    """The image files in ``folder`` (and below it if ``recursive``), sorted, hidden files (``._x.png``) skipped."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in candidates
        if path.suffix.lower() in extensions and not path.name.startswith(".") and path.is_file()
    )


def collect_image_files(inputs: Iterable[str | os.PathLike], *, recursive: bool = False) -> list[Path]:
    """Files as given plus the image files of given folders, in order, without repeats (``ImageInputError``
    for a missing path or a folder without images)."""
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


def is_complete_png(path: str | os.PathLike) -> bool:
    """A regular file that starts as a PNG, ends with its IEND chunk and whose header PIL reads (cheap: outputs
    are written atomically, so anything else at an output path comes from elsewhere and is redone)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size < len(_PNG_SIGNATURE) + len(_PNG_END):
            return False
        with path.open("rb") as handle:
            head = handle.read(len(_PNG_SIGNATURE))
            handle.seek(-len(_PNG_END), os.SEEK_END)
            tail = handle.read()
        if head != _PNG_SIGNATURE or tail != _PNG_END:
            return False
        with Image.open(path) as image:
            return image.format == "PNG" and image.width > 0 and image.height > 0
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


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


def _check_header(image: Image.Image, path: Path, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise ImageInputError(
            f"{path}: the image declares {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), more than "
            f"the decompression-bomb limit of {max_pixels / 1e6:.1f} megapixels (raise it with --max-image-pixels)"
        )
    frames = getattr(image, "n_frames", 1)
    # Only real animations: a camera's MPO JPEG also has several frames (the photo, then previews).
    if frames > 1 and image.format in _ANIMATED_FORMATS:
        raise ImageInputError(
            f"{path}: an animated image ({frames} frames); only still images are upscaled: extract the frames first"
        )


def load_image(
    path: str | os.PathLike, *, max_pixels: int | None = None, check_size: Callable[[int, int], None] | None = None
) -> LoadedImage:
    """Read PNG/JPEG/WebP (any mode: grey, palette, RGBA, 16-bit) honouring EXIF orientation.  Before decoding,
    refuses empty files, animated images and more than ``max_pixels`` (None: PIL's limit; 0: none), then calls
    ``check_size(height, width)`` (oriented), which may raise."""
    path = Path(path)
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    try:
        if path.stat().st_size == 0:
            raise ImageInputError(f"{path}: the file is empty (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our message
            with Image.open(path) as image:
                _check_header(image, path, max_pixels)
                if check_size is not None:
                    width, height = image.size
                    quarter_turn = image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
                    check_size(*((width, height) if quarter_turn else (height, width)))
                image.load()
                image = ImageOps.exif_transpose(image)
                rgb, alpha = _planes(image)
    except FileNotFoundError as error:
        raise ImageInputError(f"{path}: no such file") from error
    except PermissionError as error:
        raise ImageInputError(f"{path}: cannot read the file ({error.strerror})") from error
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{path}: {error} (PIL.Image.MAX_IMAGE_PIXELS is {Image.MAX_IMAGE_PIXELS})") from error
    except UnidentifiedImageError as error:
        raise ImageInputError(f"{path}: not an image this program can read (PNG, JPEG or WebP expected)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"{path}: the image data is damaged or truncated ({error})") from error
    rgb_tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    alpha_tensor = None if alpha is None else torch.from_numpy(np.ascontiguousarray(alpha))[None, None]
    return LoadedImage(rgb=rgb_tensor, alpha=alpha_tensor)


# Pixels converted to 8 bits at a time: float temporaries of a strip of rows, not of the whole image.
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
