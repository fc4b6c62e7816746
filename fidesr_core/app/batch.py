"""Upscaling image files: input discovery, output naming, skip-existing, atomic writes.  An output never
replaces an input; one image's failure is recorded with its name while the batch goes on."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import FiDeSRError, ImageInputError, OutOfMemory
from ..networks.model import OneStepRestorer
from ..ops.preprocess import processing_size, resize_image
from ..pipeline import upscale
from ..runtime import Runtime
from ..settings import UpscaleSettings
from .image_io import IMAGE_EXTENSIONS, image_files_in, is_complete_png, load_image, save_png_atomic

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, why), the reason without the path
    interrupted: bool = False

    def merge(self, other: BatchResult) -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.failed += other.failed
        self.interrupted = self.interrupted or other.interrupted


def _sources(inputs: Sequence[Path], output_dir: Path, *, recursive: bool) -> list[tuple[Path, Path]]:
    """``(source, output folder)`` for every input; ``--recursive`` mirrors sub-folders under ``output_dir``."""
    output_resolved = output_dir.resolve()
    found: list[tuple[Path, Path]] = []
    for path in inputs:
        if path.is_dir():
            images = [
                image
                for image in image_files_in(path, recursive=recursive)
                # outputs written into an input folder are not inputs of the next run
                if not (recursive and image.resolve().is_relative_to(output_resolved))
            ]
            if not images:
                raise ImageInputError(f"{path}: folder holds no PNG, JPEG or WebP files")
            found += [(image, output_dir / image.parent.relative_to(path)) for image in images]
        elif path.is_file():
            found.append((path, output_dir))
        else:
            raise ImageInputError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


def plan_outputs(inputs: Sequence[Path], output_dir: Path, *, recursive: bool = False) -> list[tuple[Path, Path]]:
    """Pair each input with ``output_dir/[sub-folder/]<stem>.png``, sorted; ``ImageInputError`` when two inputs
    would share an output, or an output would be an input."""
    sources = _sources([Path(path) for path in inputs], Path(output_dir), recursive=recursive)
    inputs_resolved = {source.resolve(): source for source, _ in sources}
    planned: dict[Path, Path] = {}
    for source, folder in sources:
        target = folder / f"{source.stem}.png"
        if target in planned:
            raise ImageInputError(f"{planned[target]} and {source} would both be written to {target}; rename one")
        replaced = inputs_resolved.get(target.resolve())
        if replaced is not None:
            raise ImageInputError(
                f"the output for {source} would replace the input {replaced}; choose another -o folder"
            )
        planned[target] = source
    return sorted(((source, target) for target, source in planned.items()), key=lambda pair: str(pair[1]))


def pending(pairs: Sequence[tuple[Path, Path]], *, overwrite: bool) -> list[tuple[Path, Path]]:
    """The pairs still to do: all with ``overwrite``, else those whose output is not a complete PNG."""
    return [pair for pair in pairs if overwrite or not is_complete_png(pair[1])]


def describe_failure(error: Exception, source: Path, target: Path) -> str:
    """One line for the summary, for the person who gave ``source``; no internal file names."""
    if isinstance(error, FiDeSRError):  # the engine's out-of-memory error too: it says what to change
        return str(error).removeprefix(f"{source}: ")
    if isinstance(error, OSError):
        return f"cannot write {target}: {error.strerror or error}"
    return f"{type(error).__name__}: {error}"


def upscale_file(
    model: OneStepRestorer,
    source: Path,
    target: Path,
    settings: UpscaleSettings,
    *,
    max_image_pixels: int | None = None,
    stage_bar: tqdm | None = None,
) -> None:
    """Upscale one file to an 8-bit PNG (alpha resized alongside); ``max_image_pixels``: see ``load_image``."""
    if source.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageInputError(f"{source}: not a PNG, JPEG or WebP file")

    def check_size(height: int, width: int) -> None:  # before decoding: refuse what cannot be processed
        processing_size(height, width, upscale_by=settings.upscale_by, process_size=settings.process_size)

    loaded = load_image(source, max_pixels=max_image_pixels, check_size=check_size)

    def on_stage(stage: str, done: int, total: int) -> None:
        if stage_bar is not None:
            stage_bar.set_postfix_str(f"{source.name}: {stage} {done}/{total}")

    restored = upscale(model, loaded.rgb, settings, runtime=Runtime(progress=on_stage))
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
    max_image_pixels: int | None = None,
    show_progress: bool = True,
) -> BatchResult:
    """Upscale every ``(source, target)``, skipping complete outputs unless ``overwrite``; one image's failure goes
    to ``failed`` and the batch goes on; Ctrl-C stops it with ``interrupted`` set."""
    result = BatchResult()
    with tqdm(total=len(pairs), unit="img", disable=not show_progress, dynamic_ncols=True) as bar:
        for source, target in pairs:
            try:
                if not overwrite and is_complete_png(target):
                    result.skipped.append(target)
                else:
                    upscale_file(model, source, target, settings, max_image_pixels=max_image_pixels, stage_bar=bar)
                    result.written.append(target)
            except KeyboardInterrupt:
                result.interrupted = True
                break
            except Exception as error:  # one image must not stop the batch, whatever went wrong
                reason = describe_failure(error, source, target)
                logger.debug("%s failed", source, exc_info=True)
                if isinstance(error, OutOfMemory) and model.device.type == "cuda":
                    torch.cuda.empty_cache()
                result.failed.append((source, reason))
                bar.write(f"failed: {source}: {reason}")
            bar.update(1)
    return result
