"""Upscaling image files: input discovery, output naming, skip-existing, atomic writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import FiDeSRError, ImageInputError
from ..networks.model import OneStepRestorer
from ..pipeline import UpscaleSettings, upscale
from ..steps.preprocess import resize_image
from .image_io import load_image, save_png_atomic

__all__ = ["BatchResult", "plan_outputs", "upscale_file", "upscale_files"]


@dataclass
class BatchResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def plan_outputs(inputs: Sequence[Path], output_dir: Path) -> list[tuple[Path, Path]]:
    """Pair each input with ``output_dir/<stem>.png``; two inputs that would share an output are an error."""
    planned: dict[Path, Path] = {}
    for source in inputs:
        target = output_dir / f"{source.stem}.png"
        if target in planned:
            raise ImageInputError(f"{planned[target]} and {source} would both be written to {target}; rename one")
        planned[target] = source
    return [(source, target) for target, source in planned.items()]


def upscale_file(
    model: OneStepRestorer,
    source: Path,
    target: Path,
    settings: UpscaleSettings,
    *,
    stage_bar: tqdm | None = None,
) -> None:
    """Upscale one file to an 8-bit PNG (alpha, if any, resized bicubically alongside)."""
    loaded = load_image(source)

    def on_stage(stage: str, done: int, total: int) -> None:
        if stage_bar is not None:
            stage_bar.set_postfix_str(f"{source.name}: {stage} {done}/{total}")

    restored = upscale(model, loaded.rgb, settings, stage_progress=on_stage)
    alpha = None
    if loaded.alpha is not None:
        alpha = resize_image(loaded.alpha, tuple(restored.shape[-2:]))[0]
    save_png_atomic(target, restored[0], alpha)


def upscale_files(
    model: OneStepRestorer,
    pairs: Sequence[tuple[Path, Path]],
    settings: UpscaleSettings,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
) -> BatchResult:
    """Upscale every ``(source, target)``; existing targets are skipped unless ``overwrite``.

    A bad image is recorded in ``failed`` and the batch goes on.
    """
    result = BatchResult()
    with tqdm(total=len(pairs), unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
        for source, target in pairs:
            if target.exists() and not overwrite:
                result.skipped.append(target)
            else:
                try:
                    upscale_file(model, source, target, settings, stage_bar=bar)
                    result.written.append(target)
                except FiDeSRError as error:
                    result.failed.append((source, str(error)))
                    bar.write(f"failed: {error}")
            bar.update(1)
    return result
