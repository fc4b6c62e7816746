"""Step-level parity of the image steps around the network: each equals the released code's (docs/algorithm.md §2.1, §2.6, §2.9).

Latent tiling, colour fix and pre-processing.  Float32 on the CPU; the reference lives
in ``reference_image_steps.py`` and never calls the engine.  Tolerances are float32
round-off, not behavioural slack.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_helpers import assert_matches_reference as _close
from parity_helpers import smooth_image as _smooth_image
from PIL import Image
from reference_image_steps import (
    _pil_resample_matrix,
    ref_adain,
    ref_bicubic_resize,
    ref_gaussian_1d,
    ref_pil_bicubic_resize,
    ref_prepare_lq,
    ref_tile_starts,
    ref_tiled,
    ref_wavelet,
)

from fidesr_core.ops.color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix
from fidesr_core.ops.latent_tiling import gaussian_tile_weight, run_tiled, tile_starts
from fidesr_core.ops.preprocess import prepare_lq, processing_size, resize_image

# ------------------------------------------------------------------- latent tiling


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 95, 96, 97, 128, 160, 161, 200, 257, 1000])
@pytest.mark.parametrize(("tile", "overlap"), [(96, 32), (32, 8), (16, 6)])
def test_tile_starts_match_released_loop(length: int, tile: int, overlap: int) -> None:
    if length < tile:
        return  # the clamp happens before tile_starts
    expected = ref_tile_starts(length, tile, overlap)
    got = tile_starts(length, tile, overlap)
    assert list(got) == expected
    assert got[0] == 0 and got[-1] == length - tile


@pytest.mark.parametrize(("height", "width"), [(96, 96), (64, 96), (33, 50), (1, 7)])
def test_gaussian_tile_weight_matches_formula(height: int, width: int) -> None:
    weight = gaussian_tile_weight(height, width)
    expected = torch.outer(ref_gaussian_1d(height), ref_gaussian_1d(width)).float()
    assert weight.shape == (height, width)
    # Any constant factor cancels in the blend; the shape must be exact.
    _close(weight / weight.max(), expected / expected.max(), atol=1e-6, rtol=1e-6)


def _local_fn() -> torch.nn.Module:
    """A position-dependent fn (zero-padded conv + bias): tile borders change its output, so blending shows."""
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.3)
    torch.nn.init.normal_(conv.bias, std=0.3)
    return conv.eval()


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [((100, 150), 96, 32), ((97, 97), 96, 32), ((24, 40), 16, 6), ((10, 10), 16, 6)]
)
def test_run_tiled_matches_reference(size: tuple[int, int], tile: int, overlap: int) -> None:
    torch.manual_seed(16)
    fn = _local_fn()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        _close(run_tiled(fn, x, tile_size=tile, overlap=overlap), ref_tiled(fn, x, tile, overlap))


def test_run_tiled_short_side_below_tile_with_large_area() -> None:
    """Latent 64x200 (short side < 96, area > 96²): the released code crashes; clamping first works."""
    torch.manual_seed(17)
    fn = _local_fn()
    x = torch.randn(1, 4, 64, 200)
    with torch.no_grad():
        out = run_tiled(fn, x, tile_size=96, overlap=32)
    assert out.shape == (1, 3, 64, 200) and torch.isfinite(out).all()
    _close(out, ref_tiled(fn, x, 96, 32, square_clamp=False))


@pytest.mark.parametrize(("size", "tile", "overlap"), [((100, 150), 96, 32), ((64, 200), 96, 32), ((37, 53), 16, 6)])
def test_run_tiled_identity_reproduces_input(size: tuple[int, int], tile: int, overlap: int) -> None:
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(18))
    out = run_tiled(lambda t: t, x, tile_size=tile, overlap=overlap)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------- colour fix


def _colour_pair(size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = (_smooth_image(2, *size, seed=seed) * 0.4 + 0.3).clamp(0, 1)
    reference = (_smooth_image(2, *size, seed=seed + 1) * 0.5 + 0.5).clamp(0, 1)
    return image, reference


@pytest.mark.parametrize("size", [(8, 8), (40, 56), (128, 192)])
def test_adain_matches_reference(size: tuple[int, int]) -> None:
    image, reference = _colour_pair(size, seed=19)
    _close(adain_color_fix(image, reference), ref_adain(image, reference))
    _close(apply_color_fix(image, reference, "adain"), ref_adain(image, reference))


@pytest.mark.parametrize("size", [(8, 8), (40, 56), (128, 192)])
def test_wavelet_matches_reference(size: tuple[int, int]) -> None:
    image, reference = _colour_pair(size, seed=20)
    _close(wavelet_color_fix(image, reference), ref_wavelet(image, reference))
    _close(apply_color_fix(image, reference, "wavelet"), ref_wavelet(image, reference))


# ------------------------------------------------------------------ pre-processing


@pytest.mark.parametrize(
    ("size", "pre", "proc"),
    [
        ((32, 48), (128, 192), (512, 768)),
        ((128, 128), (128, 128), (512, 512)),
        ((127, 300), (128, 302), (512, 1208)),
        ((200, 300), (200, 300), (800, 1200)),
        ((7, 13), (128, 237), (512, 944)),
        ((1, 1), (128, 128), (512, 512)),
        ((13, 7), (237, 128), (944, 512)),
        ((130, 131), (130, 131), (520, 520)),
    ],
)
def test_processing_sizes_follow_released_rule(
    size: tuple[int, int], pre: tuple[int, int], proc: tuple[int, int]
) -> None:
    """Short side < 128 → short side 128 with int truncation, ×4, each side down to a multiple of 8."""
    assert processing_size(*size) == (pre, proc)


@pytest.mark.parametrize("size", [(32, 48), (24, 40), (130, 132)])
def test_prepare_lq_matches_reference(size: tuple[int, int]) -> None:
    image = (_smooth_image(1, *size, seed=21) * 0.5 + 0.5).clamp(0, 1)
    pixels, output_size = ref_prepare_lq(image)
    prepared = prepare_lq(image)
    assert tuple(prepared.output_size) == output_size == (4 * size[0], 4 * size[1])
    _close(prepared.pixels, pixels, atol=2e-6)


def test_resize_image_is_pil_bicubic_kernel() -> None:
    """torch antialiased bicubic == PIL's a=−0.5 resampler written out (float64 numpy), up and down."""
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(22))
    as_hwc = image[0].permute(1, 2, 0).double().numpy()
    for size in [(128, 192), (131, 77), (16, 20), (9, 200)]:
        expected = np.clip(ref_pil_bicubic_resize(as_hwc, size), 0, 1)
        got = resize_image(image, size)[0].permute(1, 2, 0).double().numpy()
        assert np.abs(got - expected).max() < 5e-6
        _close(resize_image(image, size), ref_bicubic_resize(image, size), atol=5e-6)


def _pil_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BICUBIC)).astype(np.float64)


def test_resize_image_against_pil_on_8bit_images() -> None:
    """Within ~1/255 of PIL on a natural-like image; on pure noise PIL's per-pass uint8 clipping dominates."""
    yy, xx = np.mgrid[0:32, 0:48]
    smooth = np.stack([127 + 100 * np.sin(xx / 5 + c) * np.cos(yy / 7) for c in range(3)], -1).astype(np.uint8)
    noise = (np.random.default_rng(23).random((32, 48, 3)) * 255).astype(np.uint8)
    differences = {}
    for name, array in (("smooth", smooth), ("noise", noise)):
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
        got = resize_image(tensor, (128, 192))[0].permute(1, 2, 0).double().numpy() * 255
        differences[name] = float(np.abs(got - _pil_resize(array, (128, 192))).max())
        # PIL = the same kernel, rounded and clipped to uint8 after the horizontal and the vertical pass.
        rows, cols = _pil_resample_matrix(32, 128), _pil_resample_matrix(48, 192)
        horizontal = np.clip(np.round(np.einsum("wj,hjc->hwc", cols, array.astype(np.float64))), 0, 255)
        emulated = np.clip(np.round(np.einsum("hi,iwc->hwc", rows, horizontal)), 0, 255)
        assert np.abs(emulated - _pil_resize(array, (128, 192))).max() <= 1.0
    print(f"max |engine − PIL| in 8-bit levels: {differences}")
    assert differences["smooth"] <= 1.5
