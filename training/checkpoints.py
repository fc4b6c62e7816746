"""Checkpoints: FiDeSR weights in both formats plus the exact-resume training state.

Layout (``step`` zero-padded to six digits)::

    OUTPUT/checkpoints/step-000500/
        fidesr.pkl              the authors' layout (docs/algorithm.md §6): their test script and fidesr_core load it
        fidesr.safetensors      the same weights in our safetensors layout
        training_state/         accelerate save_state: optimizer, GradScaler, RNG states per process,
                                plus trainable.safetensors (LoRA + LRRB, float32) and trainer_state.json

A checkpoint is written to ``step-000500.partial`` and renamed when complete, so a
crash never leaves a half-written folder that ``--resume latest`` would pick.  Only
the last ``keep_last`` checkpoints are kept.  The frozen networks are never saved:
accelerate's per-model state is replaced by the trainable tensors (a save/load hook).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fidesr_core.errors import ModelFileError, SettingsError

from .generator import FiDeSRGenerator

__all__ = [
    "CHECKPOINTS_DIR",
    "STATE_DIR",
    "WEIGHT_FILES",
    "TrainerState",
    "checkpoint_name",
    "list_checkpoints",
    "find_checkpoint",
    "write_weights",
    "register_state_hooks",
    "save_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_DIR = "training_state"
TRAINABLE_FILE = "trainable.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
WEIGHT_FILES: dict[str, str] = {"pkl": "fidesr.pkl", "safetensors": "fidesr.safetensors"}
_STEP_FOLDER = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimiser steps done
    micro_step: int  # forward passes done per process (step · gradient_accumulation)
    extra: Mapping[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, ``(step, folder)`` oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_FOLDER.fullmatch(folder.name)
        if match and (folder / STATE_DIR / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def find_checkpoint(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """``"latest"``: the newest complete checkpoint of ``output_dir`` (None if there is none);
    otherwise ``resume`` must be a checkpoint folder (or its ``training_state``)."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    folder = Path(resume).expanduser()
    if folder.name == STATE_DIR:
        folder = folder.parent
    if not (folder / STATE_DIR / TRAINER_STATE_FILE).is_file():
        raise SettingsError(
            f"--resume {resume}: {folder} is not a complete training checkpoint "
            f"(expected {STATE_DIR}/{TRAINER_STATE_FILE} inside; use 'latest' or a checkpoints/step-N folder)"
        )
    return folder


def write_weights(
    generator: FiDeSRGenerator, folder: Path, formats: Sequence[str], metadata: Mapping[str, str]
) -> list[Path]:
    """Write the generator's LoRA + LRRB as ``fidesr.pkl`` and/or ``fidesr.safetensors`` into ``folder``."""
    from fidesr_core.loading.weights import save_restorer_weights

    weights = generator.export_weights(metadata)
    written = []
    for file_format in formats:
        if file_format not in WEIGHT_FILES:
            raise SettingsError(f"checkpoint format {file_format!r} is not one of {tuple(WEIGHT_FILES)}")
        path = folder / WEIGHT_FILES[file_format]
        save_restorer_weights(weights, path, file_format=file_format)
        written.append(path)
    return written


def register_state_hooks(accelerator, generator: FiDeSRGenerator) -> None:
    """Make ``accelerator.save_state``/``load_state`` keep only the trainable tensors of the model.

    Without this accelerate would write the whole prepared model (frozen SD weights
    included, ~5 GB) into every checkpoint.
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_file(generator.trainable_state(), os.path.join(output_dir, TRAINABLE_FILE))
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            raise ModelFileError(f"training state {input_dir} has no {TRAINABLE_FILE}")
        generator.load_trainable_state(load_file(str(path)))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all); returns the deleted folders."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(output_dir)
    doomed = [folder for _, folder in found[:-keep_last]]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def save_checkpoint(
    accelerator,
    generator: FiDeSRGenerator,
    output_dir: str | os.PathLike,
    *,
    step: int,
    micro_step: int,
    formats: Sequence[str],
    keep_last: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` (every process must call this; the main one writes the files)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    partial = root / f"{checkpoint_name(step)}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / STATE_DIR).mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial / STATE_DIR))
    if accelerator.is_main_process:
        metadata = {"trainer": "training.train", "step": str(step)}
        write_weights(generator, partial, formats, metadata)
        state = {"step": step, "micro_step": micro_step, **dict(extra or {})}
        (partial / STATE_DIR / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | os.PathLike) -> TrainerState:
    """Restore trainable tensors, optimizer, GradScaler and RNG states from ``folder``; return its counters.

    Needs :func:`register_state_hooks` on ``accelerator`` first.
    """
    state_dir = Path(folder) / STATE_DIR
    try:
        counters = json.loads((state_dir / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        step, micro_step = int(counters["step"]), int(counters["micro_step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelFileError(f"{state_dir / TRAINER_STATE_FILE} is missing or damaged: {error}") from error
    accelerator.load_state(str(state_dir))
    extra = {key: value for key, value in counters.items() if key not in ("step", "micro_step")}
    return TrainerState(step=step, micro_step=micro_step, extra=extra)
