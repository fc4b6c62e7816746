"""The whole upscale in one call: its settings, and the chain of the steps in ``latent_steps``.

FiDeSR, PiSA-SR and OSEDiff run the same chain; the model's recipe says what differs per
family (docs/algorithm.md §9).  The ComfyUI nodes run the same steps one per node, so both
give bit-identical results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from .errors import SettingsError
from .latent_steps import decode_step, encode_step, injection_step, refine_step, residual_step
from .networks.model import OneStepRestorer
from .ops.color_fix import COLOR_FIX_METHODS, ColorFixMethod
from .ops.injection import HighFrequencySettings, LowFrequencySettings
from .ops.preprocess import PROCESS_SIZE
from .ops.vae_codec import LATENT_MODES, LatentMode
from .progress import CancelCheck, ProgressCallback, StageProgressCallback, check_cancelled
from .step_runner import StepRunner
from .tiled_vae.budget import MAP_MEMORY_MB, MemoryBudget

__all__ = ["STAGES", "UpscaleSettings", "upscale"]

STAGES: tuple[str, ...] = ("encode", "unet", "lrrb", "lfim", "decode")


@dataclass(frozen=True)
class UpscaleSettings:
    """Every knob of one upscale; defaults reproduce the released test scripts.

    ``pixel_strength`` / ``semantic_strength``: PiSA-SR's adjustable mode (``λ_pix``, ``λ_sem``);
    both None is its default mode.  FiDeSR and OSEDiff have one LoRA set and ignore them.
    """

    upscale_by: float = 4.0
    latent_mode: LatentMode = "sample"
    seed: int = 0
    color_fix: ColorFixMethod = "adain"
    tile_size: int = 96  # latent px for the U-Net; 0 = never tile
    tile_overlap: int = 32
    encode_tile_size: int = 1024  # image px
    decode_tile_size: int = 224  # latent px
    process_size: int = PROCESS_SIZE  # short side the upscaled image is brought up to (the released script's)
    low: LowFrequencySettings = field(default_factory=LowFrequencySettings)
    high: HighFrequencySettings = field(default_factory=HighFrequencySettings)
    pixel_strength: float | None = None
    semantic_strength: float | None = None
    vae_memory_mb: int = MAP_MEMORY_MB  # whole-image VAE maps kept in RAM; the rest go to temporary files (TMPDIR)

    def __post_init__(self) -> None:
        # Each message starts with the field's name: the CLI swaps it for the flag's.
        _check_number("upscale_by", self.upscale_by, 1.0, 16.0)
        if self.latent_mode not in LATENT_MODES:
            raise SettingsError(f"latent_mode must be one of {LATENT_MODES}, got {self.latent_mode!r}")
        _check_integer("seed", self.seed, 0, 2**64 - 1)  # what torch.Generator.manual_seed takes (and ComfyUI gives)
        if self.color_fix not in COLOR_FIX_METHODS:
            raise SettingsError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {self.color_fix!r}")
        _check_integer("tile_size", self.tile_size, 0, None, "0 (never tile) or a positive number of latent pixels")
        _check_integer("tile_overlap", self.tile_overlap, 0, None)
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise SettingsError(
                f"tile_overlap must be smaller than tile_size ({self.tile_size}), got {self.tile_overlap}"
            )
        for name, minimum, unit in (("encode_tile_size", 8, "pixels"), ("decode_tile_size", 1, "latent pixels")):
            value = getattr(self, name)
            _check_integer(name, value, 0, None, f"0 (never tile) or at least {minimum} {unit}")
            if 0 < value < minimum:
                raise SettingsError(f"{name} must be 0 (never tile) or at least {minimum} {unit}, got {value}")
        _check_integer("process_size", self.process_size, 8, 8192)
        for branch, values in (("low", self.low), ("high", self.high)):
            for item in fields(values):
                value = getattr(values, item.name)
                if isinstance(value, float | int) and not isinstance(value, bool):
                    _check_number(f"{branch}.{item.name}", value, None, None)
        for name in ("pixel_strength", "semantic_strength"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, -10.0, 10.0)  # None: PiSA-SR's default mode
        _check_integer("vae_memory_mb", self.vae_memory_mb, 0, 1 << 30, "an integer >= 0 (MiB; 0 = every map in files)")

    def vae_budget(self) -> MemoryBudget:
        """The tiled VAE's memory budget these settings ask for."""
        return MemoryBudget(map_bytes=self.vae_memory_mb << 20)


def _check_number(name: str, value: object, low: float | None, high: float | None) -> None:
    """A finite real number, within ``[low, high]`` when bounds are given."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    if low is not None and high is not None and not low <= value <= high:
        raise SettingsError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


def _check_integer(name: str, value: object, low: int, high: int | None, wanted: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        wanted = wanted or (f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}")
        raise SettingsError(f"{name} must be {wanted}, got {value!r}")


def _stage(stage_progress: StageProgressCallback | None, stage: str) -> ProgressCallback | None:
    if stage_progress is None:
        return None
    return lambda done, total: stage_progress(stage, done, total)


@torch.no_grad()
def upscale(
    model: OneStepRestorer,
    image: torch.Tensor,
    settings: UpscaleSettings | None = None,
    *,
    prompt_embedding: torch.Tensor | None = None,
    stage_progress: StageProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    runner: StepRunner | None = None,
) -> torch.Tensor:
    """Super-resolve ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, round(s·H), round(s·W)]`` in [0, 1], float32 on CPU.

    ``prompt_embedding`` (``[1 or B, 77, dim]``) replaces the model's own prompt embedding (its
    family's released prompt, or the prompt it was loaded with).
    """
    settings = settings or UpscaleSettings()
    injects = bool(settings.low.strength or settings.high.strength)
    state = encode_step(
        model,
        image,
        upscale_by=settings.upscale_by,
        latent_mode=settings.latent_mode,
        seed=settings.seed,
        tile_size=settings.encode_tile_size,
        process_size=settings.process_size,
        with_gate=injects,
        vae_budget=settings.vae_budget(),
        runner=runner,
        progress=_stage(stage_progress, "encode"),
        should_cancel=should_cancel,
    )
    state = residual_step(
        model,
        state,
        prompt_embedding=prompt_embedding,
        tile_size=settings.tile_size,
        tile_overlap=settings.tile_overlap,
        pixel_strength=settings.pixel_strength,
        semantic_strength=settings.semantic_strength,
        runner=runner,
        progress=_stage(stage_progress, "unet"),
        should_cancel=should_cancel,
    )
    check_cancelled(should_cancel)
    state = refine_step(model, state, runner=runner)
    if stage_progress:
        stage_progress("lrrb", 1, 1)
    # A strength of 0 adds exactly nothing; leaving the branch out only saves its work.
    for branch in (settings.low, settings.high):
        if branch.strength:
            state = injection_step(state, branch, runner=runner)
    if stage_progress:
        stage_progress("lfim", 1, 1)
    decoded = decode_step(
        model,
        state,
        color_fix=settings.color_fix,
        tile_size=settings.decode_tile_size,
        vae_budget=settings.vae_budget(),
        runner=runner,
        progress=_stage(stage_progress, "decode"),
        should_cancel=should_cancel,
    )
    return decoded.cpu()
