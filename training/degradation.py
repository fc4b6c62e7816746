"""On-the-fly LQ synthesis: the Real-ESRGAN second-order degradation with FiDeSR's parameters (docs/algorithm.md §5).

For HQ crops ``[B, 3, H, W]`` in [0, 1] and scale ``s`` (4):

1. blur (random kernel per image) -> random resize -> noise (Gaussian or Poisson) -> JPEG
2. blur with probability 0.5 -> random resize towards ``H/s`` -> noise
3. in random order, ``[resize to H//s x W//s, final sinc filter, JPEG]`` or ``[JPEG, resize, sinc]``
4. clamp and round to 8 bit; then (``resize_back``) bicubic back to ``H x W`` as the trainer feeds it.

Per image: blur kernels and their parameters, the second-blur and final-sinc coin flips, noise type,
strength and grey/colour choice, JPEG qualities. Per batch (as in the released trainer, which keeps the
batch one tensor): the resize directions, scales and interpolation modes and the order of the last
stage. ``per_sample_resize=True`` makes those per image as well by running the chain image by image.

Everything runs batched in torch on the images' device; ``generator`` makes it reproducible. The
degradation is data preparation and runs without autograd. The stages themselves (kernels, resizing,
noise, JPEG) are in ``training.degradation_stages``; this module holds the settings and the chain.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from fidesr_core.errors import ImageInputError, SettingsError

from .blur_kernels import KERNEL_TYPES, RandomStream, sample_blur_kernels, sample_final_sinc_kernels
from .degradation_stages import (
    RESIZE_MODES,
    Range,
    add_random_noise,
    apply_kernels,
    jpeg_round_trip,
    random_resize,
    resize_images,
)

__all__ = [
    "DEFAULT_CONFIG",
    "DegradationConfig",
    "RealESRGANDegradation",
    "STAGE_SWITCHES",
    "apply_kernels",
    "degrade",
    "make_generator",
]

STAGE_SWITCHES = (
    "first_blur",
    "first_resize",
    "first_noise",
    "first_jpeg",
    "second_blur",
    "second_resize",
    "second_noise",
    "final_sinc",
    "second_jpeg",
    "quantize",
)
MIN_LQ_SIDE = 4  # smaller LQ images are rejected: below this the degradation is meaningless
_add_random_noise = add_random_noise  # its name here before the stages moved to training.degradation_stages


@dataclass(frozen=True)
class DegradationConfig:
    """Every probability and range of the degradation (defaults: docs/algorithm.md §5) plus a switch per stage."""

    scale: int = 4
    kernel_size: int = 21  # all kernels are padded to this size
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = tuple(KERNEL_TYPES)
    kernel_type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    # first degradation
    sinc_prob: float = 0.1
    blur_sigma: Range = (0.2, 3.0)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: Range = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Range = (1.0, 15.0)  # σ in 1/255 units
    poisson_scale_range: Range = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Range = (60.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.5
    sinc_prob2: float = 0.1
    blur_sigma2: Range = (0.2, 1.5)
    betag_range2: Range = (0.5, 4.0)
    betap_range2: Range = (1.0, 2.0)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: Range = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Range = (1.0, 12.0)
    poisson_scale_range2: Range = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    final_sinc_prob: float = 0.8
    resize_first_prob: float = 0.5  # last stage [resize, sinc, JPEG]; otherwise [JPEG, resize, sinc]
    jpeg_range2: Range = (60.0, 100.0)
    # stage switches (tests and ablations)
    first_blur: bool = True
    first_resize: bool = True
    first_noise: bool = True
    first_jpeg: bool = True
    second_blur: bool = True
    second_resize: bool = True
    second_noise: bool = True
    final_sinc: bool = True
    second_jpeg: bool = True
    quantize: bool = True
    # output
    resize_back: bool = True  # bicubic LQ -> H x W, as the trainer feeds it
    per_sample_resize: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    def with_stages_off(self, *stages: str) -> DegradationConfig:
        """A copy with the named stages (all of :data:`STAGE_SWITCHES` when none are named) switched off."""
        unknown = [name for name in stages if name not in STAGE_SWITCHES]
        if unknown:
            raise SettingsError(f"unknown degradation stage(s) {unknown}; expected names from {STAGE_SWITCHES}")
        return dataclasses.replace(self, **dict.fromkeys(stages or STAGE_SWITCHES, False))


_PROBABILITIES = frozenset(
    {"sinc_prob", "sinc_prob2", "gaussian_noise_prob", "gaussian_noise_prob2", "gray_noise_prob", "gray_noise_prob2",
     "second_blur_prob", "final_sinc_prob", "resize_first_prob"}
)  # fmt: skip
_RANGES = frozenset(
    {"blur_sigma", "blur_sigma2", "betag_range", "betag_range2", "betap_range", "betap_range2", "resize_range",
     "resize_range2", "noise_range", "noise_range2", "poisson_scale_range", "poisson_scale_range2", "jpeg_range",
     "jpeg_range2"}
)  # fmt: skip


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(f"DegradationConfig: {message}")


def _validate(config: DegradationConfig) -> None:
    _check(isinstance(config.scale, int) and config.scale >= 1, f"scale must be a positive int, got {config.scale}")
    _check(config.kernel_size % 2 == 1, f"kernel_size must be odd, got {config.kernel_size}")
    _check(
        bool(config.kernel_sizes) and all(k % 2 == 1 and 1 <= k <= config.kernel_size for k in config.kernel_sizes),
        f"kernel_sizes must be odd and at most kernel_size={config.kernel_size}, got {config.kernel_sizes}",
    )
    _check(
        all(name in KERNEL_TYPES for name in config.kernel_types),
        f"kernel_types must be among {tuple(KERNEL_TYPES)}, got {config.kernel_types}",
    )
    _check(
        bool(config.resize_modes) and all(mode in RESIZE_MODES for mode in config.resize_modes),
        f"resize_modes must be among {RESIZE_MODES}, got {config.resize_modes}",
    )
    for name in ("kernel_type_probs", "resize_probs", "resize_probs2"):
        probs = getattr(config, name)
        _check(
            all(p >= 0 for p in probs) and math.isclose(sum(probs), 1.0, abs_tol=1e-6),
            f"{name} must be non-negative and sum to 1, got {probs}",
        )
    _check(
        len(config.kernel_type_probs) == len(config.kernel_types),
        f"kernel_type_probs has {len(config.kernel_type_probs)} entries for {len(config.kernel_types)} kernel_types",
    )
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in _PROBABILITIES:
            _check(0.0 <= value <= 1.0, f"{field.name} must be in [0, 1], got {value}")
        elif field.name in _RANGES:
            _check(len(value) == 2 and 0 <= value[0] <= value[1], f"{field.name} must be (low, high), got {value}")
    for name in ("blur_sigma", "blur_sigma2", "betag_range", "betag_range2", "betap_range", "betap_range2"):
        _check(getattr(config, name)[0] > 0, f"{name} must be positive, got {getattr(config, name)}")
    for name in ("jpeg_range", "jpeg_range2"):
        _check(getattr(config, name)[1] <= 100, f"{name} must lie in [0, 100], got {getattr(config, name)}")


DEFAULT_CONFIG = DegradationConfig()


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _check_images(hq: torch.Tensor, config: DegradationConfig) -> None:
    if not isinstance(hq, torch.Tensor) or hq.ndim != 4 or hq.shape[1] != 3:
        shape = tuple(hq.shape) if isinstance(hq, torch.Tensor) else type(hq).__name__
        raise ImageInputError(f"degrade: expected an RGB batch [B, 3, H, W], got {shape}")
    if not hq.is_floating_point():
        raise ImageInputError(f"degrade: expected floating-point images in [0, 1], got dtype {hq.dtype}")
    smallest = MIN_LQ_SIDE * config.scale
    if hq.shape[-2] < smallest or hq.shape[-1] < smallest:
        raise ImageInputError(
            f"degrade: images must be at least {smallest}x{smallest} pixels for scale {config.scale}, "
            f"got {hq.shape[-2]}x{hq.shape[-1]}"
        )


def _degrade_batch(hq: torch.Tensor, config: DegradationConfig, rng: RandomStream) -> torch.Tensor:
    out = hq.float()
    batch, _, height, width = out.shape
    lq_size = (height // config.scale, width // config.scale)
    first_kernels = {
        "kernel_sizes": config.kernel_sizes,
        "kernel_types": config.kernel_types,
        "type_probs": config.kernel_type_probs,
        "size": config.kernel_size,
    }

    # first degradation
    if config.first_blur:
        kernels = sample_blur_kernels(
            batch,
            rng,
            **first_kernels,
            sigma_range=config.blur_sigma,
            betag_range=config.betag_range,
            betap_range=config.betap_range,
            sinc_prob=config.sinc_prob,
        )
        out = apply_kernels(out, kernels)
    if config.first_resize:
        out = random_resize(
            out,
            rng,
            probs=config.resize_probs,
            scale_range=config.resize_range,
            base_size=(out.shape[-2], out.shape[-1]),
            modes=config.resize_modes,
        )
    if config.first_noise:
        out = add_random_noise(
            out,
            rng,
            gaussian_prob=config.gaussian_noise_prob,
            sigma_range=config.noise_range,
            poisson_range=config.poisson_scale_range,
            gray_prob=config.gray_noise_prob,
        )
    if config.first_jpeg:
        out = jpeg_round_trip(out, rng.uniform(batch, *config.jpeg_range))

    # second degradation
    if config.second_blur:
        kernels = sample_blur_kernels(
            batch,
            rng,
            **first_kernels,
            sigma_range=config.blur_sigma2,
            betag_range=config.betag_range2,
            betap_range=config.betap_range2,
            sinc_prob=config.sinc_prob2,
        )
        skip = (rng.uniform(batch) >= config.second_blur_prob).view(-1, 1, 1)
        pulse = torch.zeros_like(kernels)
        pulse[:, config.kernel_size // 2, config.kernel_size // 2] = 1
        out = apply_kernels(out, torch.where(skip, pulse, kernels))
    if config.second_resize:
        out = random_resize(
            out,
            rng,
            probs=config.resize_probs2,
            scale_range=config.resize_range2,
            base_size=(height / config.scale, width / config.scale),
            modes=config.resize_modes,
        )
    if config.second_noise:
        out = add_random_noise(
            out,
            rng,
            gaussian_prob=config.gaussian_noise_prob2,
            sigma_range=config.noise_range2,
            poisson_range=config.poisson_scale_range2,
            gray_prob=config.gray_noise_prob2,
        )

    # last stage: [resize, sinc, JPEG] or [JPEG, resize, sinc]
    resize_first = float(rng.uniform(1).item()) < config.resize_first_prob
    mode = config.resize_modes[rng.pick([1 / len(config.resize_modes)] * len(config.resize_modes))]
    sinc = None
    if config.final_sinc:
        sinc = sample_final_sinc_kernels(
            batch, rng, kernel_sizes=config.kernel_sizes, prob=config.final_sinc_prob, size=config.kernel_size
        )
    quality = rng.uniform(batch, *config.jpeg_range2) if config.second_jpeg else None
    if not resize_first and quality is not None:
        out = jpeg_round_trip(out, quality)
    out = resize_images(out, lq_size, mode)
    if sinc is not None:
        out = apply_kernels(out, sinc)
    if resize_first and quality is not None:
        out = jpeg_round_trip(out, quality)

    out = out.clamp(0, 1)
    if config.quantize:
        out = (out * 255).round() / 255
    if config.resize_back:
        out = resize_images(out, (height, width), "bicubic").clamp(0, 1)
    return out


@torch.no_grad()
def degrade(
    hq: torch.Tensor,
    *,
    config: DegradationConfig = DEFAULT_CONFIG,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Synthesise LQ images from HQ crops ``[B, 3, H, W]`` in [0, 1].

    Returns ``[B, 3, H, W]`` (``resize_back``) or ``[B, 3, H // scale, W // scale]`` in [0, 1], in the
    dtype of ``hq``; any ``H, W`` of at least ``4 · scale`` pixels is accepted (sizes are floored).
    ``generator`` (on any device; see :class:`~training.blur_kernels.RandomStream`) makes the result
    reproducible; without it the global RNG is used. For CUDA images prefer a CUDA generator
    (``make_generator(seed, "cuda")``): a CPU one works but draws the noise on the CPU and copies it.
    """
    _check_images(hq, config)
    rng = RandomStream(hq.device, generator)
    if config.per_sample_resize and hq.shape[0] > 1:
        out = torch.cat([_degrade_batch(hq[i : i + 1], config, rng) for i in range(hq.shape[0])])
    else:
        out = _degrade_batch(hq, config, rng)
    return out.to(hq.dtype)


class RealESRGANDegradation(nn.Module):
    """``nn.Module`` wrapper of :func:`degrade` (no parameters; runs on whatever device the input is on)."""

    def __init__(self, config: DegradationConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        self.config = config

    def forward(self, hq: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return degrade(hq, config=self.config, generator=generator)

    def extra_repr(self) -> str:
        return f"scale={self.config.scale}, resize_back={self.config.resize_back}"
