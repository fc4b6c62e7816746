"""The whole upscale as one call, composed of the public step functions, for FiDeSR, PiSA-SR and OSEDiff.

    prepare_lq -> encode_image -> predict_residual -> refine_residual
    -> LF/HF injection -> decode_latent -> colour fix -> resize to output

Each step is public so the ComfyUI nodes and the trainer reuse the same code; the model's
recipe says what differs per family (docs/algorithm.md §9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from .errors import SettingsError
from .networks.model import OneStepRestorer
from .progress import CancelCheck, ProgressCallback, StageProgressCallback, check_cancelled
from .steps.color_fix import COLOR_FIX_METHODS, ColorFixMethod, apply_color_fix
from .steps.injection import HighFrequencySettings, LowFrequencySettings, inject_frequencies, spatial_gate
from .steps.preprocess import PROCESS_SIZE, prepare_lq, resize_image, resize_to_output
from .steps.restoration import predict_residual, refine_residual, restored_latent
from .steps.vae_codec import LATENT_MODES, LatentMode, decode_latent, encode_image

__all__ = ["STAGES", "UpscaleSettings", "upscale", "finish_image"]

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


def finish_image(
    decoded: torch.Tensor, upscaled_lq: torch.Tensor, output_size: tuple[int, int], color_fix: ColorFixMethod
) -> torch.Tensor:
    """Colour-fix the decoded ``[B, 3, H, W]`` in [0, 1] against the upscaled LQ (in [-1, 1]), then resize."""
    reference = resize_image((upscaled_lq.float().to(decoded.device) + 1.0).mul_(0.5), tuple(decoded.shape[-2:]))
    return resize_to_output(apply_color_fix(decoded, reference, color_fix), output_size)


@torch.no_grad()
def upscale(
    model: OneStepRestorer,
    image: torch.Tensor,
    settings: UpscaleSettings | None = None,
    *,
    prompt_embedding: torch.Tensor | None = None,
    stage_progress: StageProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Super-resolve ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, round(s·H), round(s·W)]`` in [0, 1], float32 on CPU.

    ``prompt_embedding`` (``[1 or B, 77, dim]``) replaces the model's own prompt embedding (its
    family's released prompt, or the prompt it was loaded with).
    """
    settings = settings or UpscaleSettings()
    # Resize on the model's device: on a GPU the CPU resize would cost more than the U-Net.
    prepared = prepare_lq(image.to(model.device), upscale_by=settings.upscale_by, process_size=settings.process_size)
    z_lq = encode_image(
        model,
        prepared.pixels,
        latent_mode=settings.latent_mode,
        seed=settings.seed,
        tile_size=settings.encode_tile_size,
        progress=_stage(stage_progress, "encode"),
        should_cancel=should_cancel,
    )
    residual = predict_residual(
        model,
        z_lq,
        prompt_embedding=prompt_embedding,
        tile_size=settings.tile_size,
        tile_overlap=settings.tile_overlap,
        pixel_strength=settings.pixel_strength,
        semantic_strength=settings.semantic_strength,
        progress=_stage(stage_progress, "unet"),
        should_cancel=should_cancel,
    )
    check_cancelled(should_cancel)
    refined = refine_residual(model, z_lq, residual)
    if stage_progress:
        stage_progress("lrrb", 1, 1)
    latent = restored_latent(z_lq, refined)
    if settings.low.strength or settings.high.strength:
        gate = spatial_gate(prepared.pixels.to(latent.device), tuple(latent.shape[-2:]))
        latent = inject_frequencies(latent, z_lq, gate, settings.low, settings.high)
    if stage_progress:
        stage_progress("lfim", 1, 1)
    decoded = decode_latent(
        model,
        latent,
        tile_size=settings.decode_tile_size,
        progress=_stage(stage_progress, "decode"),
        should_cancel=should_cancel,
    )
    return finish_image(decoded, prepared.pixels, prepared.output_size, settings.color_fix).cpu()
