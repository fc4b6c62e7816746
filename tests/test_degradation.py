"""Real-ESRGAN second-order degradation (training/degradation.py, training/blur_kernels.py) on small CPU images."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fidesr_core.errors import ImageInputError, SettingsError
from training.blur_kernels import (
    RandomStream,
    circular_lowpass_kernels,
    gaussian_family_kernels,
    normalize_kernels,
    sample_blur_kernels,
    sample_final_sinc_kernels,
    window_mask,
)
from training.degradation import (
    DEFAULT_CONFIG,
    STAGE_SWITCHES,
    DegradationConfig,
    RealESRGANDegradation,
    _add_random_noise,
    degrade,
    make_generator,
)
from training.preview_degradation import main as preview_main

ALL_OFF = DEFAULT_CONFIG.with_stages_off()


def _images(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth gradients plus texture, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, width).expand(height, width)
    texture = torch.rand(batch, 3, height, width, generator=generator)
    return (0.6 * ramp + 0.4 * texture).clamp(0, 1)


def _blur_kernels(n: int, seed: int, **overrides) -> torch.Tensor:
    settings = {
        "kernel_sizes": DEFAULT_CONFIG.kernel_sizes,
        "kernel_types": DEFAULT_CONFIG.kernel_types,
        "type_probs": DEFAULT_CONFIG.kernel_type_probs,
        "sigma_range": DEFAULT_CONFIG.blur_sigma,
        "betag_range": DEFAULT_CONFIG.betag_range,
        "betap_range": DEFAULT_CONFIG.betap_range,
        "sinc_prob": DEFAULT_CONFIG.sinc_prob,
    } | overrides
    return sample_blur_kernels(n, RandomStream("cpu", make_generator(seed)), **settings)


# --- whole pipeline ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_in_unit_range_with_input_size_and_dtype(seed: int) -> None:
    hq = _images(batch=3)
    lq = degrade(hq, generator=make_generator(seed))
    assert lq.shape == hq.shape and lq.dtype == hq.dtype
    assert torch.isfinite(lq).all()
    assert lq.min() >= 0 and lq.max() <= 1


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 72), (66, 70), (67, 81)])
def test_sizes_floor_to_scale_and_resize_back(height: int, width: int) -> None:
    hq = _images(batch=2, height=height, width=width)
    small = degrade(hq, config=dataclasses.replace(DEFAULT_CONFIG, resize_back=False), generator=make_generator(3))
    assert small.shape == (2, 3, height // 4, width // 4)
    back = degrade(hq, generator=make_generator(3))
    assert back.shape == (2, 3, height, width)


def test_scale_two_gives_half_size() -> None:
    config = DegradationConfig(scale=2, resize_back=False)
    assert degrade(_images(height=40, width=48), config=config, generator=make_generator(0)).shape == (2, 3, 20, 24)


@pytest.mark.parametrize(
    "bad",
    [torch.rand(1, 3, 12, 64), torch.rand(1, 3, 64, 15), torch.rand(1, 4, 64, 64), torch.rand(3, 64, 64)],
)
def test_unusable_inputs_are_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ImageInputError):
        degrade(bad)


def test_integer_images_are_rejected() -> None:
    with pytest.raises(ImageInputError, match="floating-point"):
        degrade(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("seed", [0, 5])
def test_output_is_8_bit_when_quantising(seed: int) -> None:
    config = dataclasses.replace(DEFAULT_CONFIG, resize_back=False)
    levels = degrade(_images(), config=config, generator=make_generator(seed)) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    unquantised = degrade(_images(), config=dataclasses.replace(config, quantize=False), generator=make_generator(seed))
    assert not torch.allclose(unquantised * 255, (unquantised * 255).round(), atol=1e-3)


def test_same_seed_same_output_other_seed_other_output() -> None:
    hq = _images()
    first = degrade(hq, generator=make_generator(11))
    again = degrade(hq, generator=make_generator(11))
    other = degrade(hq, generator=make_generator(12))
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_module_wrapper_matches_function() -> None:
    hq = _images()
    module = RealESRGANDegradation()
    assert torch.equal(module(hq, make_generator(4)), degrade(hq, generator=make_generator(4)))


def test_all_stages_off_is_plain_bicubic_down_and_up() -> None:
    hq = _images(height=64, width=72)
    config = dataclasses.replace(ALL_OFF, resize_modes=("bicubic",))
    lq = degrade(hq, config=config, generator=make_generator(0))
    down = F.interpolate(hq, size=(16, 18), mode="bicubic", align_corners=False).clamp(0, 1)
    expected = F.interpolate(down, size=(64, 72), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(lq, expected, atol=1e-6, rtol=0)


# Probabilities forced so that switching a stage on always changes something.
CERTAIN = dataclasses.replace(
    ALL_OFF,
    resize_modes=("bicubic",),
    resize_probs=(0.0, 1.0, 0.0),
    resize_probs2=(1.0, 0.0, 0.0),
    second_blur_prob=1.0,
    final_sinc_prob=1.0,
)


@pytest.mark.parametrize("stage", STAGE_SWITCHES)
def test_each_stage_switches_on_alone(stage: str) -> None:
    hq = _images()
    baseline = degrade(hq, config=CERTAIN, generator=make_generator(0))
    changed = degrade(hq, config=dataclasses.replace(CERTAIN, **{stage: True}), generator=make_generator(0))
    assert (changed - baseline).abs().max() > 1e-3, f"switching {stage} on changed nothing"


def test_with_stages_off_names_only_those_stages() -> None:
    config = DEFAULT_CONFIG.with_stages_off("first_jpeg", "quantize")
    assert not config.first_jpeg and not config.quantize
    assert all(getattr(config, name) for name in STAGE_SWITCHES if name not in ("first_jpeg", "quantize"))
    with pytest.raises(SettingsError, match="unknown degradation stage"):
        DEFAULT_CONFIG.with_stages_off("first_jpg")


def test_images_of_one_batch_get_their_own_degradation() -> None:
    hq = _images(batch=1).expand(4, -1, -1, -1).contiguous()
    config = DEFAULT_CONFIG.with_stages_off("first_noise", "second_noise")  # no noise: differences come from params
    lq = degrade(hq, config=config, generator=make_generator(7))
    for i in range(4):
        for j in range(i + 1, 4):
            assert (lq[i] - lq[j]).abs().max() > 1e-3, f"images {i} and {j} were degraded identically"


def test_per_sample_resize_keeps_sizes() -> None:
    config = dataclasses.replace(DEFAULT_CONFIG, per_sample_resize=True)
    hq = _images(batch=3)
    lq = degrade(hq, config=config, generator=make_generator(1))
    assert lq.shape == hq.shape and torch.equal(lq, degrade(hq, config=config, generator=make_generator(1)))


@pytest.mark.parametrize("fill", [0.0, 1.0])
@pytest.mark.parametrize("gaussian_prob", [0.0, 1.0])
def test_constant_extreme_images_stay_finite(fill: float, gaussian_prob: float) -> None:
    config = dataclasses.replace(
        DEFAULT_CONFIG, gaussian_noise_prob=gaussian_prob, gaussian_noise_prob2=gaussian_prob, sinc_prob=0.5
    )
    hq = torch.full((3, 3, 64, 64), fill)
    for seed in range(3):
        lq = degrade(hq, config=config, generator=make_generator(seed))
        assert torch.isfinite(lq).all() and lq.min() >= 0 and lq.max() <= 1


def test_half_precision_input_round_trips_dtype() -> None:
    lq = degrade(_images().half(), generator=make_generator(0))
    assert lq.dtype == torch.float16 and torch.isfinite(lq).all()


# --- noise ------------------------------------------------------------------------------------------------


def _noise(images: torch.Tensor, **settings) -> torch.Tensor:
    return _add_random_noise(images, RandomStream("cpu", make_generator(0)), **settings) - images


def test_gaussian_noise_has_requested_strength_and_grey_noise_is_shared() -> None:
    flat = torch.full((2, 3, 96, 96), 0.5)
    colour = _noise(flat, gaussian_prob=1.0, sigma_range=(10.0, 10.0), poisson_range=(1.0, 1.0), gray_prob=0.0)
    assert colour.std().item() == pytest.approx(10 / 255, rel=0.05)
    assert (colour[:, 0] - colour[:, 1]).abs().max() > 1e-3
    grey = _noise(flat, gaussian_prob=1.0, sigma_range=(10.0, 10.0), poisson_range=(1.0, 1.0), gray_prob=1.0)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])


def test_poisson_noise_is_unbiased_and_grows_with_scale() -> None:
    images = _images(batch=2, height=96, width=96)
    weak = _noise(images, gaussian_prob=0.0, sigma_range=(1.0, 1.0), poisson_range=(0.2, 0.2), gray_prob=0.0)
    strong = _noise(images, gaussian_prob=0.0, sigma_range=(1.0, 1.0), poisson_range=(2.0, 2.0), gray_prob=0.0)
    assert abs(weak.mean().item()) < 2e-3
    assert strong.std() > 5 * weak.std() > 0


# --- kernels ----------------------------------------------------------------------------------------------


def test_sampled_kernels_have_shape_unit_sum_and_differ_per_sample() -> None:
    kernels = _blur_kernels(64, seed=0, sinc_prob=0.3)
    assert kernels.shape == (64, 21, 21)
    torch.testing.assert_close(kernels.sum(dim=(-2, -1)), torch.ones(64), atol=1e-5, rtol=0)
    assert torch.isfinite(kernels).all()
    flat = kernels.reshape(64, -1)
    distances = torch.cdist(flat, flat) + torch.eye(64)
    assert distances.min() > 1e-6, "two samples got the same kernel"
    # point symmetry, which lets conv2d (a correlation) stand in for convolution
    torch.testing.assert_close(kernels, kernels.flip(-1, -2), atol=1e-6, rtol=0)


def test_kernel_support_fits_the_drawn_size() -> None:
    kernels = _blur_kernels(32, seed=1, kernel_sizes=(7,), sinc_prob=0.5)
    outside = 1 - window_mask(torch.tensor([7]), 21)
    assert (kernels * outside).abs().max() == 0
    assert window_mask(torch.tensor([7, 21]), 21).sum(dim=(-2, -1)).tolist() == [49.0, 441.0]


def test_final_sinc_kernels_are_pulses_or_lowpass() -> None:
    rng = RandomStream("cpu", make_generator(2))
    never = sample_final_sinc_kernels(5, rng, kernel_sizes=(7, 21), prob=0.0)
    pulse = torch.zeros(21, 21)
    pulse[10, 10] = 1
    assert torch.equal(never, pulse.expand(5, 21, 21))
    always = sample_final_sinc_kernels(5, rng, kernel_sizes=(7, 21), prob=1.0)
    torch.testing.assert_close(always.sum(dim=(-2, -1)), torch.ones(5), atol=1e-5, rtol=0)
    assert (always[:, 10, 10] < 1).all()


def _grid() -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(21, dtype=np.float64) - 10
    x, y = np.meshgrid(axis, axis)  # x varies along columns
    return x, y


def test_isotropic_gaussian_matches_the_textbook_formula() -> None:
    sigma = 1.7
    kernel = normalize_kernels(
        gaussian_family_kernels(
            torch.tensor([sigma]), torch.tensor([sigma]), torch.tensor([0.0]), torch.ones(1), torch.tensor([False]), 21
        )
    )[0]
    x, y = _grid()
    expected = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    np.testing.assert_allclose(kernel.numpy(), expected / expected.sum(), atol=1e-7)


def test_anisotropic_gaussian_rotates_with_theta() -> None:
    def kernel(theta: float) -> torch.Tensor:
        return gaussian_family_kernels(
            torch.tensor([3.0]), torch.tensor([0.8]), torch.tensor([theta]), torch.ones(1), torch.tensor([False]), 21
        )[0]

    flat = kernel(0.0)
    assert flat[10, 13] > flat[13, 10]  # wide along x (columns) at θ = 0
    torch.testing.assert_close(kernel(math.pi / 2), flat.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(kernel(math.pi), flat, atol=1e-6, rtol=0)


def test_generalized_and_plateau_shapes() -> None:
    sigma, beta = 2.0, 1.5
    x, y = _grid()
    quadratic = (x**2 + y**2) / sigma**2
    args = (torch.tensor([sigma]), torch.tensor([sigma]), torch.tensor([0.0]), torch.tensor([beta]))
    generalized = gaussian_family_kernels(*args, torch.tensor([False]), 21)[0]
    plateau = gaussian_family_kernels(*args, torch.tensor([True]), 21)[0]
    np.testing.assert_allclose(generalized.numpy(), np.exp(-0.5 * quadratic**beta), atol=1e-6)
    np.testing.assert_allclose(plateau.numpy(), 1 / (1 + quadratic**beta), atol=1e-6)


def test_sinc_kernel_is_radially_symmetric_and_matches_jinc() -> None:
    cutoff = torch.tensor([math.pi / 4, 2.0])
    kernels = circular_lowpass_kernels(cutoff, 21)
    for kernel in kernels:
        for image in (kernel.T, kernel.flip(0), kernel.flip(1), kernel.rot90(1)):
            torch.testing.assert_close(image, kernel, atol=1e-7, rtol=0)
        # (0, 5) and (3, 4) lie on the same circle of radius 5
        torch.testing.assert_close(kernel[10, 15], kernel[13, 14], atol=1e-7, rtol=0)
    special = pytest.importorskip("scipy.special")
    x, y = _grid()
    radius = np.hypot(x, y)
    for omega, kernel in zip(cutoff.tolist(), kernels, strict=True):
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = omega * special.j1(omega * radius) / (2 * np.pi * radius)
        expected[10, 10] = omega**2 / (4 * np.pi)
        np.testing.assert_allclose(kernel.numpy(), expected, atol=1e-6)


# --- config -----------------------------------------------------------------------------------------------


def test_defaults_follow_the_spec() -> None:
    config = DegradationConfig()
    assert config.kernel_type_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) and config.sinc_prob == 0.1
    assert (config.blur_sigma, config.blur_sigma2) == ((0.2, 3.0), (0.2, 1.5))
    assert (config.resize_probs, config.resize_range) == ((0.2, 0.7, 0.1), (0.3, 1.5))
    assert (config.resize_probs2, config.resize_range2) == ((0.3, 0.4, 0.3), (0.6, 1.2))
    assert (config.noise_range, config.noise_range2) == ((1.0, 15.0), (1.0, 12.0))
    assert (config.poisson_scale_range, config.poisson_scale_range2) == ((0.05, 2.0), (0.05, 1.0))
    assert (config.jpeg_range, config.jpeg_range2) == ((60.0, 95.0), (60.0, 100.0))
    assert (config.second_blur_prob, config.final_sinc_prob, config.gray_noise_prob) == (0.5, 0.8, 0.4)


@pytest.mark.parametrize(
    "bad",
    [
        {"resize_probs": (0.5, 0.5, 0.5)},
        {"sinc_prob": 1.5},
        {"jpeg_range": (60.0, 120.0)},
        {"blur_sigma": (3.0, 0.2)},
        {"kernel_sizes": (8,)},
        {"kernel_types": ("box",), "kernel_type_probs": (1.0,)},
        {"resize_modes": ("nearest",)},
        {"scale": 0},
    ],
)
def test_invalid_settings_raise(bad: dict) -> None:
    with pytest.raises(SettingsError):
        DegradationConfig(**bad)


# --- preview CLI ------------------------------------------------------------------------------------------


def test_preview_writes_a_grid(tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (80, 70)), ("b.jpg", (40, 50)), ("c.png", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    output = tmp_path / "grid.png"
    assert preview_main([str(folder), "-o", str(output), "--count", "2", "--crop", "64", "--seed", "3"]) == 0
    with Image.open(output) as grid:
        assert grid.size == (2 * 64 + 3 * 8, 2 * 64 + 3 * 8)
    assert not list(tmp_path.glob(".grid.png.*"))  # no temp file left behind


def test_preview_reports_missing_input(tmp_path, capsys) -> None:
    assert preview_main([str(tmp_path / "nothing"), "-o", str(tmp_path / "grid.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()
