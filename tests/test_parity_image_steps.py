"""Step-level parity of the image steps around the network: each equals the released code's (docs/algorithm.md §2.1, §2.6, §2.8, §2.9).

Latent tiling, colour fix, pre-processing and the finishing after the decoder (8-bit inputs: the
released PIL steps, equal bit for bit; other inputs: the float path).  Float32 on the CPU; the reference lives
in ``reference_image_steps.py`` and never calls the engine.  Tolerances are float32
round-off, not behavioural slack.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_helpers import assert_eight_bit_close
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
    ref_released_finish,
    ref_tile_starts,
    ref_tiled,
    ref_to_tensor,
    ref_wavelet,
)

from fidesr_core.app.image_io import load_image
from fidesr_core.ops.color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix
from fidesr_core.ops.latent_tiling import gaussian_tile_weight, run_tiled, tile_starts
from fidesr_core.ops.preprocess import prepare_lq, processing_size, resize_image, resize_to_output
from fidesr_core.pipeline import finish_image

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
        ((49, 61), (127, 159), (504, 632)),  # int(128 / 49 · 49) = 127 in floats, as released
    ],
)
def test_processing_sizes_follow_released_rule(
    size: tuple[int, int], pre: tuple[int, int], proc: tuple[int, int]
) -> None:
    """Short side < 128 → sides int(128 / short · side), ×4, each side down to a multiple of 8."""
    assert processing_size(*size) == (pre, proc)


@pytest.mark.parametrize(
    ("size", "upscale", "pre", "proc"),
    [
        ((171, 170), 3, (171, 170), (512, 504)),  # threshold 512 // 3 = 170: not pre-scaled
        ((60, 171), 3, (170, 484), (504, 1448)),
        ((100, 131), 2, (256, 335), (512, 664)),
        ((20, 37), 8, (64, 118), (512, 944)),
        ((300, 517), 1, (512, 882), (512, 880)),
    ],
)
def test_processing_sizes_other_integer_scales_follow_released_rule(
    size: tuple[int, int], upscale: int, pre: tuple[int, int], proc: tuple[int, int]
) -> None:
    """The released threshold is process_size // upscale (integer division), sides int(scale · side)."""
    assert processing_size(*size, upscale_by=float(upscale)) == (pre, proc)


def _eight_bit_image(size: tuple[int, int], seed: int, batch: int = 1) -> torch.Tensor:
    """A smooth image with edges and noise, quantised to 8 bits: every value is k / 255, as from a PNG."""
    image = (_smooth_image(batch, *size, seed=seed) * 0.5 + 0.5).clamp(0, 1)
    return (image * 255).round() / 255


# (size, upscale): pre-scaled (x4, x2, x8), the released 127-px short side, the Lanczos shrink to a
# multiple of 8 (33x50, 49x61, 130x131, 60x171, 300x517), neither (200x300), the threshold at x3, tiny images.
EIGHT_BIT_CASES = [
    ((32, 48), 4),
    ((33, 50), 4),
    ((49, 61), 4),
    ((130, 131), 4),
    ((200, 300), 4),
    ((1, 1), 4),
    ((7, 13), 4),
    ((13, 7), 4),
    ((100, 131), 2),
    ((60, 171), 3),
    ((171, 170), 3),
    ((20, 37), 8),
    ((300, 517), 1),
]


@pytest.mark.parametrize(("size", "upscale"), EIGHT_BIT_CASES)
def test_prepare_lq_is_the_released_pil_preprocessing_on_8bit_images(size: tuple[int, int], upscale: int) -> None:
    """8-bit images: the network input equals the released scripts' PIL steps exactly (0 levels, bit for bit)."""
    image = _eight_bit_image(size, seed=21)
    pixels, output_size = ref_prepare_lq(image, upscale=upscale)
    prepared = prepare_lq(image, upscale_by=float(upscale))
    assert prepared.eight_bit == (True,)
    assert tuple(prepared.output_size) == output_size == (upscale * size[0], upscale * size[1])
    assert prepared.pixels.dtype == torch.float32 and prepared.pixels.shape == pixels.shape
    assert torch.equal(prepared.pixels, pixels)


def test_prepare_lq_on_a_comfyui_image_view() -> None:
    """A ComfyUI IMAGE is [B, H, W, C]; the nodes hand over its [B, C, H, W] view (not contiguous), in float32
    k / 255 as ComfyUI loads a PNG: the released network input all the same."""
    image = _eight_bit_image((33, 50), seed=29)
    comfy_view = image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not comfy_view.is_contiguous()
    prepared = prepare_lq(comfy_view)
    assert prepared.eight_bit == (True,)
    assert torch.equal(prepared.pixels, ref_prepare_lq(image)[0])


@pytest.mark.parametrize("size", [(33, 50), (130, 131)])
def test_released_preprocessing_differs_from_the_float_path(size: tuple[int, int]) -> None:
    """The 8-bit steps matter: resizing the same 8-bit image in float (bicubic for the multiple of 8) is
    more than a level away from the released network input, so the exactness above has teeth."""
    image = _eight_bit_image(size, seed=22)
    released, _ = ref_prepare_lq(image)
    in_float, _ = ref_prepare_lq(image + 1e-4)  # not 8-bit values: the float path
    assert float(((released - in_float) * 127.5).abs().max()) > 1.5


def test_prepare_lq_chooses_the_path_per_image() -> None:
    """A batch of an 8-bit and a float image: each is prepared as it would be alone."""
    eight_bit = _eight_bit_image((33, 50), seed=23)
    floating = (_smooth_image(1, 33, 50, seed=24) * 0.5 + 0.5).clamp(0, 1)
    prepared = prepare_lq(torch.cat([eight_bit, floating]))
    assert prepared.eight_bit == (True, False)
    assert torch.equal(prepared.pixels[:1], prepare_lq(eight_bit).pixels)
    assert torch.equal(prepared.pixels[:1], ref_prepare_lq(eight_bit)[0])
    _close(prepared.pixels[1:], prepare_lq(floating).pixels, atol=1e-6)


@pytest.mark.parametrize("size", [(32, 48), (24, 40), (130, 132), (49, 61)])
def test_prepare_lq_float_path_matches_reference(size: tuple[int, int]) -> None:
    """Images that are not 8-bit values (16-bit files, other nodes' floats) keep the float path: the
    released sizes and PIL's bicubic kernel in float, with bicubic for the multiple of 8."""
    image = (_smooth_image(1, *size, seed=21) * 0.5 + 0.5).clamp(0, 1)
    pixels, output_size = ref_prepare_lq(image)
    prepared = prepare_lq(image)
    assert prepared.eight_bit == (False,)
    assert tuple(prepared.output_size) == output_size == (4 * size[0], 4 * size[1])
    _close(prepared.pixels, pixels, atol=2e-6)
    levels = (prepared.pixels + 1) * 127.5
    assert not torch.equal(levels, levels.round())  # not rounded to 8 bits anywhere


def test_sixteen_bit_png_takes_the_float_path_unless_it_holds_8bit_values(tmp_path) -> None:
    """Through the CLI's loader: a 16-bit PNG is prepared in float; one whose values are 257 · k
    (an 8-bit image widened) is the 8-bit image and is prepared exactly as its 8-bit PNG."""
    rgb8 = (_eight_bit_image((20, 28), seed=25)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    grey8 = rgb8[..., 0]
    Image.fromarray(grey8).save(tmp_path / "eight.png")
    Image.fromarray(grey8.astype(np.uint16) * 257 + 1).save(tmp_path / "sixteen.png")  # not a multiple of 257
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "widened.png")
    loaded = {name: load_image(tmp_path / f"{name}.png").rgb for name in ("eight", "sixteen", "widened")}
    prepared = {name: prepare_lq(image) for name, image in loaded.items()}
    assert prepared["eight"].eight_bit == (True,) and prepared["widened"].eight_bit == (True,)
    assert prepared["sixteen"].eight_bit == (False,)
    assert torch.equal(prepared["eight"].pixels, ref_prepare_lq(loaded["eight"])[0])
    assert torch.equal(prepared["widened"].pixels, prepared["eight"].pixels)
    _close(prepared["sixteen"].pixels, ref_prepare_lq(loaded["sixteen"])[0], atol=2e-6)


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
    """The float resize is within ~1/255 of PIL on a natural-like image; on pure noise PIL's per-pass uint8
    clipping dominates.  (This is why 8-bit images take PIL itself, not the float resize.)"""
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
        # resize_to_output on an 8-bit image is PIL itself
        released = torch.from_numpy(_pil_resize(array, (128, 192))).permute(2, 0, 1)[None].float() / 255
        assert torch.equal(resize_to_output(tensor, (128, 192)), released)
    print(f"max |float resize − PIL| in 8-bit levels: {differences}")
    assert differences["smooth"] <= 1.5


# ---------------------------------------------------------------------- finishing


def _decoded_and_lq(size: tuple[int, int], seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A decoder output clamped to [−1, 1] ``[1, 3, H, W]`` and an 8-bit network input ``[H, W, 3]``."""
    decoded = (_smooth_image(1, *size, seed=seed) * 1.1).clamp(-1, 1)
    lq = (_eight_bit_image(size, seed=seed + 1)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return decoded, lq


@pytest.mark.parametrize("color_fix", ["adain", "wavelet", "none"])
@pytest.mark.parametrize(("size", "output_size"), [((64, 96), (64, 96)), ((64, 96), (20, 30)), ((72, 56), (75, 58))])
def test_finish_image_is_the_released_8bit_finishing(
    one_thread, color_fix: str, size: tuple[int, int], output_size: tuple[int, int]
) -> None:
    """After the decoder, for an 8-bit network input: truncation to 8 bits, colour fix against the 8-bit input,
    truncation, PIL bicubic resize back: equal to the released steps.  AdaIN runs the released operations in
    their order (bit for bit); the wavelet fix sums its detail bands in another order, which may flip a
    truncation by one level."""
    decoded, lq = _decoded_and_lq(size, seed=26)
    pixels = ref_to_tensor(lq)[None] * 2 - 1  # what prepare_lq gives for this network input
    engine = finish_image((decoded + 1.0) * 0.5, pixels, output_size, color_fix)
    expected = ref_to_tensor(ref_released_finish(decoded[0], lq, color_fix, output_size))[None]
    assert engine.shape == (1, 3, *output_size)
    assert_eight_bit_close(engine, expected, max_levels=int(color_fix == "wavelet"), max_fraction=1e-3)


def test_finish_image_float_path_for_float_inputs() -> None:
    """A network input that is not 8-bit values (the float path): colour fix and resize in float, no truncation."""
    decoded, _ = _decoded_and_lq((64, 96), seed=27)
    pixels = _smooth_image(1, 64, 96, seed=28)
    engine = finish_image((decoded + 1.0) * 0.5, pixels, (20, 30), "adain")
    image = (decoded * 0.5 + 0.5).clamp(0, 1)
    expected = ref_bicubic_resize(ref_adain(image, pixels * 0.5 + 0.5), (20, 30))
    _close(engine, expected, atol=2e-6)
    assert not torch.equal(engine * 255, (engine * 255).round())
