"""PiSA-SR parity: the engine equals the independent reference of the released inference (docs/algorithm.md §9).

A tiny random checkpoint in the authors' layout (``family_fixtures.pisa_sr_checkpoint``) is
written as ``pisa_sr.pkl`` and read by the engine's loader; the reference merges the same
tensors its own way (``reference_families.RefPiSASR``).  Float32 on the CPU,
``latent_mode="mode"``; default mode and two adjustable strength pairs, untiled and tiled (a
latent whose short side is under the tile while its area is over it: the released tiler's crash
case, fixed as for FiDeSR), each decoded with a colour fix.  The LQ is an 8-bit image, as the
released script reads it: the network input equals the released PIL steps bit for bit, latents
agree to float precision, the 8-bit output within one level.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from family_fixtures import pisa_sr_checkpoint
from parity_helpers import assert_eight_bit_close
from reference_families import RefPiSASR, ref_pisa_sr_latents, ref_prompt_embedding
from reference_image_steps import ref_prepare_lq
from reference_impl import ref_decode_and_finish, ref_lfim

from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.loading.weights import load_restorer_weights
from fidesr_core.networks.model import OneStepRestorer
from fidesr_core.networks.tiny import tiny_base_model
from fidesr_core.ops.injection import inject_frequencies, spatial_gate
from fidesr_core.ops.preprocess import prepare_lq
from fidesr_core.ops.restoration import predict_residual, refine_residual, restored_latent
from fidesr_core.ops.vae_codec import decode_latent, encode_image
from fidesr_core.pipeline import finish_image, upscale
from fidesr_core.settings import HighFrequencySettings, LowFrequencySettings, UpscaleSettings

LQ_SIZE = (32, 48)  # pre-scaled to 128x192, processed at 512x768: latent 64x96
TILE, OVERLAP = 72, 24  # latent short side 64 < 72 while 64·96 > 72²: tiled, per-axis clamp


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # exactness and tiny-tensor speed (see conftest)


@dataclass
class Pair:
    model: OneStepRestorer
    reference: RefPiSASR
    vae: torch.nn.Module
    embedding: torch.Tensor


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    reference_base = tiny_base_model(seed=0)
    checkpoint = pisa_sr_checkpoint(reference_base, seed=5)
    path = Path(tmp_path_factory.mktemp("pisa")) / "pisa_sr.pkl"
    torch.save(checkpoint, path)
    weights = load_restorer_weights(path)
    model = assemble_restorer(tiny_base_model(seed=0), weights, precision="fp32", device="cpu")
    reference = RefPiSASR(reference_base.unet, checkpoint)
    embedding = ref_prompt_embedding(copy.deepcopy(reference_base.text_encoder).eval(), "")
    return Pair(model, reference, copy.deepcopy(reference_base.vae).eval(), embedding)


def _lq_image(size: tuple[int, int] = LQ_SIZE) -> torch.Tensor:
    """A smooth image with edges in 8-bit values (k / 255), as the released script reads a PNG."""
    generator = torch.Generator().manual_seed(11)
    coarse = torch.rand(1, 3, size[0] // 4, size[1] // 4, generator=generator)
    image = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    image = (image + 0.03 * torch.randn(1, 3, *size, generator=generator)).clamp(0, 1)
    return (image * 255).round() / 255


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    difference = float((actual.float() - expected.float()).abs().max())
    assert difference <= atol, f"max |engine − reference| = {difference:.3g} > {atol:g}"


# (pixel_strength, semantic_strength): None/None is the default mode (one call with both sets).
MODES = [(None, None), (0.5, 1.4), (1.3, 0.6)]
CASES = [
    (mode, tiled, color_fix)
    for mode, color_fix in zip(MODES, ("adain", "wavelet", "adain"), strict=True)
    for tiled in (False, True)
]


def test_tiled_cases_hit_the_released_crash_case() -> None:
    """Latent 64x96 with tile 72: short side under the tile while the area is over it."""
    height, width = LQ_SIZE[0] * 4 * 4 // 8, LQ_SIZE[1] * 4 * 4 // 8
    assert height * width > TILE * TILE and min(height, width) < TILE


def test_prompt_embedding_is_the_empty_prompt(pair: Pair) -> None:
    _close(pair.model.prompt_embedding, pair.embedding, atol=1e-6)
    assert pair.model.family == "pisa-sr" and pair.model.lrrb is None


@pytest.mark.parametrize(("mode", "tiled", "color_fix"), CASES)
def test_latent_and_output_match_released(
    pair: Pair, mode: tuple[float | None, float | None], tiled: bool, color_fix: str
) -> None:
    pixel, semantic = mode
    tile = TILE if tiled else 0
    prepared = prepare_lq(_lq_image())
    with torch.no_grad():
        z_lq = encode_image(pair.model, prepared.pixels, latent_mode="mode")
        residual = predict_residual(
            pair.model, z_lq, tile_size=tile, tile_overlap=OVERLAP, pixel_strength=pixel, semantic_strength=semantic
        )
        z = restored_latent(z_lq, refine_residual(pair.model, z_lq, residual))
    pixels, output_size = ref_prepare_lq(_lq_image())
    assert torch.equal(prepared.pixels, pixels)  # the released PIL input, bit for bit
    released = {"default": True} if pixel is None else {"default": False, "lambda_pix": pixel, "lambda_sem": semantic}
    ref_z_lq, ref_z = ref_pisa_sr_latents(
        pair.reference, pair.vae, pair.embedding, pixels, tile=tile, overlap=OVERLAP, **released
    )
    assert z.shape == (1, 4, 64, 96)
    scale = max(float(ref_z.abs().max()), 1.0)
    _close(z_lq, ref_z_lq, atol=1e-5)
    _close(z, ref_z, atol=2e-5 * scale)
    assert float((ref_z - ref_z_lq).abs().max()) > 1e-2  # the LoRA sets act

    settings = UpscaleSettings(
        latent_mode="mode",
        color_fix=color_fix,
        tile_size=tile,
        tile_overlap=OVERLAP,
        lf=LowFrequencySettings(strength=0.0),
        hf=HighFrequencySettings(strength=0.0),
        pixel_strength=pixel,
        semantic_strength=semantic,
    )
    with torch.no_grad():
        output = upscale(pair.model, _lq_image(), settings)
    expected = ref_decode_and_finish(pair.vae, ref_z, pixels, output_size, color_fix)
    assert output.shape == (1, 3, 4 * LQ_SIZE[0], 4 * LQ_SIZE[1])
    assert_eight_bit_close(output, expected, max_levels=1, max_fraction=1e-3)


def test_odd_size_with_the_released_127_px_short_side(pair: Pair) -> None:
    """49x61 at x4: the released int(128 / 49 · 49) = 127 px short side, x4 to 508x636, Lanczos to 504x632;
    the released script resizes the 504x632 result back to 196x244 (PIL bicubic on 8 bits)."""
    image = _lq_image((49, 61))
    off = {"lf": LowFrequencySettings(strength=0.0), "hf": HighFrequencySettings(strength=0.0)}
    with torch.no_grad():
        output = upscale(pair.model, image, UpscaleSettings(latent_mode="mode", tile_size=0, **off))
    pixels, output_size = ref_prepare_lq(image)
    assert pixels.shape[-2:] == (504, 632) and output_size == (196, 244)
    assert torch.equal(prepare_lq(image).pixels, pixels)
    _, ref_z = ref_pisa_sr_latents(pair.reference, pair.vae, pair.embedding, pixels)
    expected = ref_decode_and_finish(pair.vae, ref_z, pixels, output_size, "adain")
    assert output.shape == (1, 3, 196, 244)
    assert_eight_bit_close(output, expected, max_levels=1, max_fraction=1e-3)


def test_strengths_change_the_result_and_equal_strengths_take_one_call(pair: Pair) -> None:
    """λ_pix = λ_sem = 1 is the default mode; different strengths give a different latent."""
    z_lq = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        default = predict_residual(pair.model, z_lq)
        ones = predict_residual(pair.model, z_lq, pixel_strength=1.0, semantic_strength=1.0)
        pixel_only = predict_residual(pair.model, z_lq, pixel_strength=1.0, semantic_strength=0.0)
        mixed = predict_residual(pair.model, z_lq, pixel_strength=0.5, semantic_strength=1.4)
    _close(ones, default, atol=1e-6)
    assert float((pixel_only - default).abs().max()) > 1e-3
    _close(mixed, 0.5 * pixel_only + 1.4 * (default - pixel_only), atol=1e-5 * max(float(default.abs().max()), 1.0))
    # The sign-flipped semantic adapters are switched off again after every call.
    with torch.no_grad():
        _close(predict_residual(pair.model, z_lq), default, atol=0.0)


def test_released_output_size_for_large_inputs(pair: Pair) -> None:
    """No pre-enlarging (short side >= 128): output is exactly 4x, as released, and ``upscale`` is the steps."""
    image = _lq_image((128, 136))
    off = {"lf": LowFrequencySettings(strength=0.0), "hf": HighFrequencySettings(strength=0.0)}
    with torch.no_grad():
        output = upscale(pair.model, image, UpscaleSettings(latent_mode="mode", tile_size=0, **off))
    assert output.shape == (1, 3, 512, 544)
    prepared = prepare_lq(image)
    with torch.no_grad():
        z_lq = encode_image(pair.model, prepared.pixels, latent_mode="mode")
        z = restored_latent(z_lq, predict_residual(pair.model, z_lq, tile_size=0))
        decoded = decode_latent(pair.model, z)
    _close(output, finish_image(decoded, prepared.pixels, prepared.output_size, "adain").cpu(), atol=1e-6)


# (released lf_scale, released hf_scale) -> effective strengths: both on halves each (docs/algorithm.md §4).
INJECTION = [((0.2, 0.0), (0.2, 0.0)), ((0.0, 0.3), (0.0, 0.3)), ((0.2, 0.2), (0.1, 0.1))]


@pytest.mark.parametrize(("released", "effective"), INJECTION)
def test_frequency_injection_is_fidesrs_on_pisa_sr_latents(pair: Pair, released: tuple, effective: tuple) -> None:
    """LF/HF on PiSA-SR: FiDeSR's injection formulas on its z_L, z and residual z_L − z."""
    low, high = LowFrequencySettings(strength=effective[0]), HighFrequencySettings(strength=effective[1])
    prepared = prepare_lq(_lq_image())
    with torch.no_grad():
        z_lq = encode_image(pair.model, prepared.pixels, latent_mode="mode")
        z = restored_latent(z_lq, refine_residual(pair.model, z_lq, predict_residual(pair.model, z_lq, tile_size=0)))
    injected = inject_frequencies(z, z_lq, spatial_gate(prepared.pixels, tuple(z.shape[-2:])), low, high)
    pixels, output_size = ref_prepare_lq(_lq_image())
    ref_z_lq, ref_z = ref_pisa_sr_latents(pair.reference, pair.vae, pair.embedding, pixels)
    expected = ref_lfim(ref_z, ref_z_lq, ref_z_lq - ref_z, pixels, lf_scale=released[0], hf_scale=released[1])
    _close(injected, expected, atol=2e-5 * max(float(expected.abs().max()), 1.0))
    assert float((expected - ref_z).abs().max()) > 1e-4  # the injection acts on this latent
    settings = UpscaleSettings(latent_mode="mode", tile_size=0, lf=low, hf=high)
    with torch.no_grad():
        output = upscale(pair.model, _lq_image(), settings)
    reference_output = ref_decode_and_finish(pair.vae, expected, pixels, output_size, "adain")
    assert_eight_bit_close(output, reference_output, max_levels=1, max_fraction=1e-3)
