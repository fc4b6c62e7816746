"""Preview the training degradation: a PNG grid of HQ crops (left) and the LQ the trainer would see (right).

    python -m training.preview_degradation IMAGE_OR_FOLDER... -o grid.png [--count N --seed S --crop 512]

Each image is centre-cropped to ``--crop`` (the shorter side is first enlarged when it is smaller), the
crops are degraded as one batch with :func:`training.degradation.degrade` and written as rows
``[HQ | LQ]``. With ``--lq-size`` the LQ is shown at its true ``1/scale`` size (nearest-neighbour
enlarged) instead of the bicubic resize back that training uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from fidesr_core.app.image_io import collect_image_files, load_image
from fidesr_core.atomic_write import write_atomic
from fidesr_core.errors import FiDeSRError, ImageInputError

from .degradation import DEFAULT_CONFIG, degrade, make_generator

__all__ = ["build_grid", "center_crop", "main"]

GAP = 8  # pixels between tiles


def center_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    """``[1, 3, crop, crop]`` centre crop of ``image`` ``[1, 3, H, W]``, enlarging it first if a side is short."""
    height, width = image.shape[-2:]
    if min(height, width) < crop:
        factor = crop / min(height, width)
        size = (max(crop, round(height * factor)), max(crop, round(width * factor)))
        image = F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        height, width = size
    top, left = (height - crop) // 2, (width - crop) // 2
    return image[..., top : top + crop, left : left + crop]


def build_grid(hq: torch.Tensor, lq: torch.Tensor) -> Image.Image:
    """One row per image: HQ ``[B, 3, S, S]`` then LQ (nearest-enlarged to ``S`` if smaller), on white."""
    batch, _, size, _ = hq.shape
    if lq.shape[-1] != size:
        lq = F.interpolate(lq, size=(size, size), mode="nearest")
    grid = Image.new("RGB", (2 * size + 3 * GAP, batch * size + (batch + 1) * GAP), "white")
    for row in range(batch):
        for column, tile in enumerate((hq[row], lq[row])):
            array = (tile.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            grid.paste(Image.fromarray(array), (GAP + column * (size + GAP), GAP + row * (size + GAP)))
    return grid


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.preview_degradation",
        description="Write a PNG grid of HQ crops (left) and their synthetic LQ (right).",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument("--count", type=int, default=4, help="number of images to show (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the degradation (default 0)")
    parser.add_argument("--crop", type=int, default=512, help="HQ crop size in pixels (default 512)")
    parser.add_argument("--device", default="cpu", help="torch device to degrade on (default cpu)")
    parser.add_argument("--lq-size", action="store_true", help="show the LQ at its true size, not resized back")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.count < 1:
            raise ImageInputError(f"--count must be at least 1, got {args.count}")
        if args.crop < 4 * DEFAULT_CONFIG.scale:
            raise ImageInputError(f"--crop must be at least {4 * DEFAULT_CONFIG.scale} pixels, got {args.crop}")
        paths = collect_image_files(args.inputs)[: args.count]
        hq = torch.cat([center_crop(load_image(path).rgb, args.crop) for path in paths]).to(args.device)
        config = dataclasses.replace(DEFAULT_CONFIG, resize_back=not args.lq_size)
        lq = degrade(hq, config=config, generator=make_generator(args.seed, hq.device))
        grid = build_grid(hq, lq)
        write_atomic(args.output, lambda temp: grid.save(temp, format="PNG"))
    except FiDeSRError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(paths)} image(s), seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
