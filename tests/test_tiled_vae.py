"""Tiled VAE: equal to the stock diffusers path (exactly in one tile, to float rounding in many), bounded memory."""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers import AutoencoderKL
from peak_memory_probe import run_probe
from torch import nn

from fidesr_core.errors import BaseModelError, Cancelled, ImageInputError, SettingsError
from fidesr_core.networks.tiny import TINY_VAE_CONFIG
from fidesr_core.tiled_vae import program as tiled_vae_program
from fidesr_core.tiled_vae.codec import decode_latents, encode_moments
from fidesr_core.tiled_vae.group_norm import GroupStats
from fidesr_core.tiled_vae.layers import Box, Conv
from fidesr_core.tiled_vae.program import decoder_program, encoder_program
from fidesr_core.tiled_vae.runner import run_program

# These tensors are tiny: one thread is faster and immune to other processes competing for the cores.
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _vae(*, attention: bool = True, seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    config = {**TINY_VAE_CONFIG, "mid_block_add_attention": attention, **overrides}
    return AutoencoderKL(**config).eval()


def _pixels(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(batch: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.fixture(scope="module")
def vae_no_attention() -> AutoencoderKL:
    return _vae(attention=False)


@pytest.fixture(scope="module")
def vae_with_attention() -> AutoencoderKL:
    return _vae(attention=True, seed=3)


@torch.no_grad()
def test_one_tile_is_the_stock_path_bit_for_bit(vae_with_attention: AutoencoderKL) -> None:
    vae, pixels, latents = vae_with_attention, _pixels(2, 64, 48), _latents(2, 8, 6)
    stock_moments = vae.encode(pixels).latent_dist.parameters
    stock_image = vae.decode(latents).sample
    for tile in (0, 64, 1024):
        assert torch.equal(encode_moments(vae, pixels, tile_size=tile), stock_moments)
    for tile in (0, 8, 224):
        assert torch.equal(decode_latents(vae, latents, tile_size=tile), stock_image)


@torch.no_grad()
def test_without_attention_many_tiles_equal_the_stock_path(vae_no_attention: AutoencoderKL) -> None:
    vae = vae_no_attention
    pixels = _pixels(2, 72, 104)  # latent 9 × 13: tiles of 4 latent px do not divide it
    stock = vae.encode(pixels).latent_dist.parameters
    tiled = encode_moments(vae, pixels, tile_size=32)
    assert tiled.shape == stock.shape == (2, 8, 9, 13)
    assert _relative_error(tiled, stock) < 1e-4

    latents = _latents(2, 13, 21)
    stock = vae.decode(latents).sample
    tiled = decode_latents(vae, latents, tile_size=5)
    assert tiled.shape == stock.shape == (2, 3, 104, 168)
    assert _relative_error(tiled, stock) < 1e-4


@torch.no_grad()
def test_without_quant_convs_many_tiles_equal_the_stock_path() -> None:
    vae = _vae(attention=False, use_quant_conv=False, use_post_quant_conv=False)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    pixels, latents = _pixels(1, 56, 40), _latents(1, 7, 9)
    tiled = encode_moments(vae, pixels, tile_size=36)  # rounded down to cores of 4 latent pixels
    assert _relative_error(tiled, vae.encode(pixels).latent_dist.parameters) < 1e-4
    assert _relative_error(decode_latents(vae, latents, tile_size=3), vae.decode(latents).sample) < 1e-4


@torch.no_grad()
def test_batch_samples_are_tiled_independently(vae_no_attention: AutoencoderKL) -> None:
    # GroupNorm statistics are per sample: a batch must give what each sample gives alone.
    latents = torch.cat([_latents(1, 10, 12, seed=5), 3.0 * _latents(1, 10, 12, seed=6) + 1.0])
    batch = decode_latents(vae_no_attention, latents, tile_size=4)
    for index in range(2):
        alone = decode_latents(vae_no_attention, latents[index : index + 1], tile_size=4)
        assert _relative_error(batch[index : index + 1], alone) < 1e-5


@torch.no_grad()
def test_group_norm_statistics_are_whole_image(vae_no_attention: AutoencoderKL) -> None:
    # Left half calm and dark, right half loud: tile-local statistics would normalise each half on its own.
    vae = vae_no_attention
    left = 0.05 * _pixels(1, 64, 64, seed=7) - 0.6
    right = _pixels(1, 64, 64, seed=8)
    pixels = torch.cat([left, right], dim=3)
    stock = vae.encode(pixels).latent_dist.parameters
    tiled = encode_moments(vae, pixels, tile_size=64)  # two tiles: exactly the two halves
    independent = torch.cat([vae.encode(half).latent_dist.parameters for half in (left, right)], dim=3)
    tiled_error, independent_error = _relative_error(tiled, stock), _relative_error(independent, stock)
    assert tiled_error < 1e-4
    assert independent_error > 100 * tiled_error and independent_error > 1e-2


def _group_stats_of_pieces(x: torch.Tensor, groups: int) -> GroupStats:
    stats = GroupStats(groups)
    for top, bottom in ((0, 4), (4, x.shape[2])):  # uneven pieces that partition the map
        for left, right in ((0, 9), (9, x.shape[3])):
            stats.add(x[..., top:bottom, left:right])
    return stats


def test_group_statistics_merged_over_tiles_are_exact() -> None:
    # One group sits far from zero, where the E[x²] − E[x]² shortcut would cancel: the exact path takes over.
    x = torch.randn(2, 8, 11, 13, generator=torch.Generator().manual_seed(4))
    x[:, 2:4] = x[:, 2:4] * 1e-3 + 1e3
    stats = _group_stats_of_pieces(x, 4)
    grouped = x.double().reshape(2, 4, -1)
    assert stats.count == grouped.shape[-1]
    assert torch.allclose(stats.mean.double(), grouped.mean(-1), rtol=1e-6)
    assert torch.allclose(stats.m2.double() / stats.count, grouped.var(-1, correction=0), rtol=1e-4)


@torch.no_grad()
def test_whole_image_statistics_normalise_like_group_norm() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 11, 13, generator=generator) * torch.linspace(0.5, 3.0, 8)[:, None, None] + 2.0
    norm = nn.GroupNorm(4, 8, eps=1e-6)
    nn.init.normal_(norm.weight, generator=generator)
    nn.init.normal_(norm.bias, generator=generator)
    stats = _group_stats_of_pieces(x, 4)
    assert torch.allclose(stats.normalize(x, norm), norm(x), atol=1e-5)
    half = stats.normalize(x[:, :, :5].bfloat16(), norm)  # a tile in bfloat16: computed in float32, cast back
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), norm(x)[:, :, :5], atol=0.05, rtol=0.02)


@torch.no_grad()
def test_attention_machinery_in_one_tile_matches_the_stock_attention(vae_with_attention: AutoencoderKL) -> None:
    # The tiled engine forced onto a single tile re-implements the mid-block attention: it must agree.
    vae, latents, pixels = vae_with_attention, _latents(1, 9, 11), _pixels(1, 72, 88)
    decoded = run_program(decoder_program(vae), latents, 16, None, None)
    assert _relative_error(decoded, vae.decode(latents).sample) < 1e-5
    moments = run_program(encoder_program(vae), pixels, 16, None, None)
    assert _relative_error(moments, vae.encode(pixels).latent_dist.parameters) < 1e-5


@torch.no_grad()
def test_with_attention_tiles_stay_close_and_leave_no_seam(
    vae_with_attention: AutoencoderKL, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae, tile = vae_with_attention, 8
    monkeypatch.setattr(
        tiled_vae_program, "ATTENTION_CONTEXT", 4
    )  # the attention then really sees only part of the latent
    latents = _latents(1, 24, 40, seed=9)
    stock = vae.decode(latents).sample
    tiled = decode_latents(vae, latents, tile_size=tile)
    error = (tiled - stock).abs().mean(dim=1)[0]  # [192, 320]
    assert error.mean() < 0.1 * stock.std()
    # error within 8 px of a tile border vs elsewhere: a seam would concentrate it at the borders
    rows, cols = torch.arange(error.shape[0]), torch.arange(error.shape[1])
    row_distance = torch.stack([(rows - 8 * tile * i).abs() for i in range(1, 3)]).amin(0)
    col_distance = torch.stack([(cols - 8 * tile * i).abs() for i in range(1, 5)]).amin(0)
    near = (row_distance[:, None] < 8) | (col_distance[None, :] < 8)
    assert error[near].mean() < 1.5 * error[~near].mean()
    # the step across each border is no bigger than the untiled image's own step there
    for i in range(1, 5):
        x = 8 * tile * i
        tiled_step = (tiled[..., x] - tiled[..., x - 1]).abs().mean()
        stock_step = (stock[..., x] - stock[..., x - 1]).abs().mean()
        assert tiled_step < 1.2 * stock_step + 0.01


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_stays_close_to_float32(vae_with_attention: AutoencoderKL, dtype: torch.dtype) -> None:
    half = _vae(attention=True, seed=3).to(dtype)
    pixels, latents = _pixels(1, 48, 80), _latents(1, 10, 14)
    tolerance = 0.02 if dtype == torch.float16 else 0.1
    moments = encode_moments(half, pixels.to(dtype), tile_size=16)
    assert moments.dtype == dtype
    assert _relative_error(moments, encode_moments(vae_with_attention, pixels, tile_size=16)) < tolerance
    decoded = decode_latents(half, latents.to(dtype), tile_size=4)
    assert decoded.dtype == dtype and torch.isfinite(decoded).all()
    assert _relative_error(decoded, decode_latents(vae_with_attention, latents, tile_size=4)) < tolerance


@torch.no_grad()
def test_progress_counts_every_tile_of_every_segment(vae_with_attention: AutoencoderKL) -> None:
    vae, calls = vae_with_attention, []
    encode_moments(vae, _pixels(1, 72, 104), tile_size=32, progress=lambda done, total: calls.append((done, total)))
    segments = 1 + sum(isinstance(m, nn.GroupNorm) for m in vae.encoder.modules())  # cut at every GroupNorm
    tiles = 3 * 4  # latent 9 × 13 in cores of at most 4
    assert calls == [(done, segments * tiles) for done in range(1, segments * tiles + 1)]

    calls.clear()
    decode_latents(vae, _latents(1, 6, 6), tile_size=8, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]


@torch.no_grad()
def test_cancellation_stops_between_tiles(vae_with_attention: AutoencoderKL) -> None:
    calls: list[int] = []
    with pytest.raises(Cancelled):
        decode_latents(
            vae_with_attention,
            _latents(1, 8, 8),
            tile_size=4,
            progress=lambda done, total: calls.append(done),
            should_cancel=lambda: len(calls) >= 5,
        )
    assert calls == [1, 2, 3, 4, 5]
    with pytest.raises(Cancelled):
        encode_moments(vae_with_attention, _pixels(1, 16, 16), should_cancel=lambda: True)


@torch.no_grad()
def test_the_vae_is_left_untouched(vae_with_attention: AutoencoderKL) -> None:
    vae = vae_with_attention
    before = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    decode_latents(vae, _latents(1, 8, 8), tile_size=4)
    encode_moments(vae, _pixels(1, 64, 64), tile_size=32)
    after = vae.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for module in vae.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_bad_inputs_are_refused(vae_no_attention: AutoencoderKL) -> None:
    vae = vae_no_attention  # tile sizes are checked once, by UpscaleSettings (test_input_bounds.py)
    with pytest.raises(SettingsError, match="tile_size 4 do not fit the ×8 VAE"):
        encode_moments(vae, _pixels(1, 32, 32), tile_size=4)
    with pytest.raises(ImageInputError, match="multiples of 8"):
        encode_moments(vae, _pixels(1, 20, 16))
    with pytest.raises(ImageInputError, match="latents"):
        decode_latents(vae, torch.zeros(1, 3, 4, 4))
    with pytest.raises(SettingsError, match="autograd"):
        decode_latents(vae, _latents(1, 8, 8).requires_grad_(), tile_size=4)


@torch.no_grad()
def test_unsupported_architectures_are_named_when_tiling_is_needed() -> None:
    vae = _vae(down_block_types=("AttnDownEncoderBlock2D",) * 4)
    pixels = _pixels(1, 32, 32)
    assert torch.equal(encode_moments(vae, pixels, tile_size=32), vae.encode(pixels).latent_dist.parameters)
    with pytest.raises(BaseModelError, match="AttnDownEncoderBlock2D"):
        encode_moments(vae, pixels, tile_size=16)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "extra_pad"),
    [
        (3, 1, 1, (0, 0, 0, 0)),
        (1, 1, 0, (0, 0, 0, 0)),
        (3, 2, 0, (0, 1, 0, 1)),
        (3, 2, 1, (0, 0, 0, 0)),
        (5, 1, 2, (0, 0, 0, 0)),
    ],
)
def test_conv_regions_are_exact(kernel: int, stride: int, padding: int, extra_pad: tuple[int, int, int, int]) -> None:
    # Any region the conv step says it computed equals the untiled conv there; needs() asks for enough input.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding)
    step = Conv(conv, extra_pad)
    full_input = torch.randn(1, 2, 22, 18)
    with torch.no_grad():
        full = conv(nn.functional.pad(full_input, extra_pad))
        generator = torch.Generator().manual_seed(1)
        for _ in range(30):
            top, bottom = sorted(torch.randint(0, full.shape[2] + 1, (2,), generator=generator).tolist())
            left, right = sorted(torch.randint(0, full.shape[3] + 1, (2,), generator=generator).tolist())
            if top == bottom or left == right:
                continue
            wanted = Box(top, bottom, left, right, *full.shape[-2:])
            need = step.needs(wanted, (22, 18))
            tile = full_input[..., need.top : need.bottom, need.left : need.right]
            out, box = step.run(tile, need)
            assert box.hull(wanted) == box
            assert torch.allclose(out, full[..., box.top : box.bottom, box.left : box.right], atol=1e-6)


_MEMORY_PROBE = """
    from fidesr_core.tiled_vae.codec import decode_latents

    latents = torch.randn(1, 4, 48, 48)  # 384 x 384 output; one 32-channel map at full size is 18 MiB

    def decode(tile_size):
        return peak_growth_kib(lambda: decode_latents(vae, latents, tile_size=tile_size))

    with torch.no_grad():
        decode(16), decode(0)  # warm-up: one-off allocations (kernels, caches) happen here
        print(json.dumps({"tiled_kib": decode(16), "untiled_kib": decode(0)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_tiled_decode_needs_less_peak_memory() -> None:
    peaks = run_probe(_MEMORY_PROBE, timeout=300)
    assert peaks["untiled_kib"] > 50 * 1024, peaks  # the measurement sees the untiled decode's full-size maps
    assert peaks["tiled_kib"] < 0.7 * peaks["untiled_kib"], peaks
