"""What the engine refuses before it allocates anything: bad settings, bad pixels, unbounded sizes.

``UpscaleSettings`` checks every field when it is built; ``prepare_lq`` checks the image's size
and pixels before resizing (docs/algorithm.md §2.1).
"""

from __future__ import annotations

import math

import pytest
import torch

from fidesr_core.errors import ImageInputError, SettingsError
from fidesr_core.ops.preprocess import MAX_PROCESSING_PIXELS, prepare_lq, processing_size
from fidesr_core.pipeline import upscale
from fidesr_core.settings import HighFrequencySettings, LowFrequencySettings, UpscaleSettings

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"upscale_by": NAN}, "upscale_by"),
        ({"upscale_by": INF}, "upscale_by"),
        ({"upscale_by": 0.0}, "upscale_by"),
        ({"upscale_by": -1.0}, "upscale_by"),
        ({"upscale_by": 100.0}, "upscale_by"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"tile_size": -5}, "tile_size"),
        ({"tile_overlap": -1}, "tile_overlap"),
        ({"tile_size": 16, "tile_overlap": 16}, "tile_overlap"),
        ({"encode_tile_size": 7}, "encode_tile_size"),
        ({"encode_tile_size": -5}, "encode_tile_size"),
        ({"decode_tile_size": -1}, "decode_tile_size"),
        ({"process_size": 4}, "process_size"),
        ({"vae_memory_mb": -1}, "vae_memory_mb"),
        ({"vae_memory_mb": 1.5}, "vae_memory_mb"),
        ({"lf": {"strength": NAN}}, "lf.strength"),
        ({"hf": {"strength": -INF}}, "hf.strength"),
        ({"hf": {"channel_tau": NAN}}, "hf.channel_tau"),
        ({"lf": {"gamma": INF}}, "lf.gamma"),
        ({"lf": {"cutoff": 0.0}}, "lf.cutoff"),
        ({"hf": {"channel_order": 0}}, "hf.channel_order"),
        ({"hf": {"filter": "square"}}, "hf.filter"),
        ({"latent_mode": "median"}, "latent_mode"),
    ],
)
def test_settings_are_checked_when_built_and_the_message_names_the_field(settings: dict, field: str) -> None:
    branches = {"lf": LowFrequencySettings, "hf": HighFrequencySettings}
    with pytest.raises(SettingsError) as caught:
        UpscaleSettings(**{k: branches[k](**v) if k in branches else v for k, v in settings.items()})
    assert str(caught.value).startswith(f"{field} must be"), str(caught.value)
    assert caught.value.setting == field and str(caught.value) == f"{field} {caught.value.problem}"


def test_valid_edge_settings_are_accepted() -> None:
    UpscaleSettings(upscale_by=1, seed=2**64 - 1, tile_size=0, tile_overlap=64, encode_tile_size=8, decode_tile_size=1)
    UpscaleSettings(upscale_by=16.0, lf=LowFrequencySettings(strength=0.0), hf=HighFrequencySettings(strength=-0.2))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ((torch.rand(1, 3, 8, 8) * 255).to(torch.uint8), "uint8 tensor"),
        (torch.rand(1, 3, 8, 8) * 255.0, "divide by 255"),
        (torch.rand(1, 3, 8, 8) * 2.0 - 1.0 - 0.5, r"\[-1, 1\] data"),
        (torch.full((1, 3, 8, 8), 0.5).index_put_((torch.tensor(0),), torch.tensor(NAN)), "NaN or infinite"),
        (torch.full((1, 3, 8, 8), INF), "NaN or infinite"),
    ],
)
def test_pixels_outside_the_unit_range_or_not_finite_are_refused(image: torch.Tensor, expected: str) -> None:
    with pytest.raises(ImageInputError, match=expected):
        prepare_lq(image)


def test_resampling_overshoot_is_clamped_not_refused() -> None:
    overshoot = torch.rand(1, 3, 8, 8) * 1.4 - 0.2  # [-0.2, 1.2], as a bicubic or Lanczos resize gives
    pixels = prepare_lq(overshoot).pixels
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0


def test_thin_strips_are_stretched_only_up_to_16_to_1() -> None:
    # Up to 16:1 the released rule holds: short side lifted to 128 (at x4).
    assert processing_size(20, 300) == ((128, 1920), (512, 7680))
    # 3000x20 used to become 19200x128 (a 76800x512 network input, 5 GB with a tiny model).
    (pre_h, pre_w), (proc_h, proc_w) = processing_size(20, 3000)
    assert (pre_h, pre_w) == (20, 3000) and (proc_h, proc_w) == (80, 12000)
    # 20x1000: stretched until the long side is 2048.
    assert processing_size(1000, 20)[0] == (2048, 40)
    assert processing_size(20, 1000, upscale_by=2.0)[0] == (81, 4096)  # target 256, cap 16 x 256
    assert processing_size(20, 1000, upscale_by=3.0)[0] == (54, 2720)  # target 512 // 3 = 170, cap 16 x 170


def test_images_that_cannot_be_bounded_are_refused_with_their_size_before_any_work() -> None:
    with pytest.raises(ImageInputError, match=r"1x20000 pixels: too thin"):
        processing_size(20000, 1)
    side = math.isqrt(MAX_PROCESSING_PIXELS) // 4 + 8  # just past the limit at x4
    with pytest.raises(ImageInputError, match=rf"{side}x{side} pixels: at ×4 it would be processed at"):
        processing_size(side, side)
    assert processing_size(side - 8, side - 8)[1] == (4 * side - 32, 4 * side - 32)


def test_upscale_refuses_an_unbounded_image_without_allocating_it(tiny_model) -> None:
    # A 1x20000 strip in a zero-stride tensor: no memory of its own; the refusal comes from its size.
    strip = torch.zeros(1, 1, 1, 1).expand(1, 3, 1, 20000)
    with pytest.raises(ImageInputError, match="too thin"):
        upscale(tiny_model, strip, UpscaleSettings())
