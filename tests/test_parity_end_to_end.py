"""End-to-end parity: the engine's upscale equals the independent reference of the released pipeline.

Same tiny random weights on both sides (non-zero LoRA and LRRB), ``latent_mode="mode"``,
float32 on the CPU, no tiling.  The reference attaches the LoRA with peft (unmerged,
scale 1), computes the empty-prompt embedding from the token ids, and re-implements
every FiDeSR-specific step (``reference_impl.py``, ``reference_image_steps.py``); only
the stock diffusers modules are shared.  The LQ is an 8-bit image, as the released script
reads it, so the engine takes the released PIL steps: the network input must be equal bit
for bit, the latent right before decoding agree to float precision and the 8-bit output
within one level (float round-off in the networks flips a truncation to 8 bits now and then).
A float (not 8-bit) input takes the float path and matches the float reference.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ldm_export import write_diffusers_folder
from parity_helpers import assert_eight_bit_close
from PIL import Image
from reference_image_steps import ref_prepare_lq, ref_tiled
from reference_impl import (
    ref_decode_and_finish,
    ref_empty_prompt_embedding,
    ref_lfim,
    ref_lora_unet,
    ref_lrrb,
    ref_restored_latent,
)

from fidesr_core.app import cli
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.loading.weights import save_restorer_weights
from fidesr_core.networks.model import OneStepRestorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights
from fidesr_core.ops.injection import inject_frequencies, spatial_gate
from fidesr_core.ops.preprocess import prepare_lq
from fidesr_core.ops.restoration import predict_residual, refine_residual, restored_latent
from fidesr_core.ops.vae_codec import decode_latent, encode_image
from fidesr_core.pipeline import finish_image, upscale
from fidesr_core.settings import HighFrequencySettings, LowFrequencySettings, UpscaleSettings

# Pre-scaled to 128x193 by the min-side rule, x4 to 512x772, Lanczos to 512x768 (latent 64x96), output 132x200.
LQ_SIZE = (33, 50)


@dataclass
class Pair:
    """The engine's assembled model and the reference's independently built pieces, from one set of weights."""

    model: OneStepRestorer
    unet: torch.nn.Module
    vae: torch.nn.Module
    lrrb_state: dict[str, torch.Tensor]
    embedding: torch.Tensor
    folder: Path  # base/ (a diffusers folder) and fidesr.pkl


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    torch.manual_seed(0)
    base = tiny_base_model(seed=0)
    weights = tiny_fidesr_weights(base, seed=0)
    folder = tmp_path_factory.mktemp("fidesr_files")  # the same weights as files, for the command line
    write_diffusers_folder(base, folder / "base")
    save_restorer_weights(weights, folder / "fidesr.pkl")
    lora = weights.lora["unet"]
    assert any(float(t.abs().max()) > 0 for k, t in lora.state.items() if "lora_B" in k)
    assert float(weights.lrrb_state["out_conv.weight"].abs().max()) > 0
    unet = ref_lora_unet(base.unet, lora.rank, lora.target_modules, lora.state)
    vae = copy.deepcopy(base.vae).eval()
    embedding = ref_empty_prompt_embedding(copy.deepcopy(base.text_encoder).eval())
    lrrb_state = {k: v.clone().float() for k, v in weights.lrrb_state.items()}
    model = assemble_restorer(base, weights, precision="fp32", device="cpu")
    return Pair(model=model, unet=unet, vae=vae, lrrb_state=lrrb_state, embedding=embedding, folder=folder)


def _lq_image(seed: int = 0, size: tuple[int, int] = LQ_SIZE, eight_bit: bool = True) -> torch.Tensor:
    """A smooth image with some edges, [1, 3, H, W] in [0, 1]; 8-bit values (k / 255, as read from a PNG)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size[0] // 4, size[1] // 4, generator=generator)
    image = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    image = (image + 0.03 * torch.randn(1, 3, *size, generator=generator)).clamp(0, 1)
    return (image * 255).round() / 255 if eight_bit else image


@dataclass
class Latents:
    pixels: torch.Tensor
    output_size: tuple[int, int]
    z_lq: torch.Tensor
    refined: torch.Tensor
    z: torch.Tensor


@pytest.fixture(scope="module")
def engine_latents(pair: Pair) -> Latents:
    """The engine's public steps one by one, up to the restored latent (before LFIM)."""
    prepared = prepare_lq(_lq_image())
    assert prepared.eight_bit == (True,)
    with torch.no_grad():
        z_lq = encode_image(pair.model, prepared.pixels, latent_mode="mode")
        residual = predict_residual(pair.model, z_lq)
        refined = refine_residual(pair.model, z_lq, residual)
        z = restored_latent(z_lq, refined)
    return Latents(prepared.pixels, tuple(prepared.output_size), z_lq, refined, z)


@pytest.fixture(scope="module")
def reference_latents(pair: Pair) -> Latents:
    pixels, output_size = ref_prepare_lq(_lq_image())
    z_lq, refined, z = ref_restored_latent(pair.unet, pair.vae, pair.lrrb_state, pair.embedding, pixels)
    return Latents(pixels, output_size, z_lq, refined, z)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    difference = float((actual.float() - expected.float()).abs().max())
    assert difference <= atol, f"max |engine − reference| = {difference:.3g} > {atol:g}"
    return difference


def test_empty_prompt_embedding_matches(pair: Pair) -> None:
    assert pair.model.prompt_embedding.shape == pair.embedding.shape
    _close(pair.model.prompt_embedding, pair.embedding, atol=1e-6)


def test_restored_latent_matches_reference(engine_latents: Latents, reference_latents: Latents) -> None:
    """z_L, r̃ = r + Δr and z = z_L − r̃ of the engine equal the reference to float precision."""
    assert engine_latents.z_lq.shape == (1, 4, 64, 96)
    assert torch.equal(engine_latents.pixels, reference_latents.pixels)  # the released PIL input, bit for bit
    _close(engine_latents.z_lq, reference_latents.z_lq, atol=1e-5)
    scale = float(reference_latents.refined.abs().max())
    _close(engine_latents.refined, reference_latents.refined, atol=1e-5 * max(scale, 1.0))
    _close(engine_latents.z, reference_latents.z, atol=1e-5 * max(scale, 1.0))
    # The LoRA and the LRRB both matter here, so a missing piece would show.
    assert float((reference_latents.refined - reference_latents.z_lq).abs().max()) > 1e-3


# (released lf_scale, released hf_scale): off, LF only, HF only, both on (the released defaults).
RELEASED_SCALES = [(0.0, 0.0), (0.2, 0.0), (0.0, 0.2), (0.2, 0.2)]


def _engine_settings(released_lf: float, released_hf: float) -> tuple[LowFrequencySettings, HighFrequencySettings]:
    """Effective strengths: both on → each at half its released scale (merge 0.5); one on → as released."""
    factor = 0.5 if released_lf > 0 and released_hf > 0 else 1.0
    return LowFrequencySettings(strength=factor * released_lf), HighFrequencySettings(strength=factor * released_hf)


@pytest.mark.parametrize(("released_lf", "released_hf"), RELEASED_SCALES)
def test_latent_before_decode_matches_reference(
    engine_latents: Latents, reference_latents: Latents, released_lf: float, released_hf: float
) -> None:
    low, high = _engine_settings(released_lf, released_hf)
    e = engine_latents
    gate = spatial_gate(e.pixels, tuple(e.z.shape[-2:]))
    engine_final = inject_frequencies(e.z, e.z_lq, gate, low, high)
    r = reference_latents
    if released_lf == 0 and released_hf == 0:
        expected = r.z
    else:
        expected = ref_lfim(r.z, r.z_lq, r.refined, r.pixels, lf_scale=released_lf, hf_scale=released_hf)
    _close(engine_final, expected, atol=2e-5 * max(float(expected.abs().max()), 1.0))
    if released_lf or released_hf:
        assert float((expected - r.z).abs().max()) > 1e-4  # LFIM really acts on this latent


def _reference_output(pair: Pair, r: Latents, released_lf: float, released_hf: float, color_fix: str) -> torch.Tensor:
    latent = r.z
    if released_lf or released_hf:
        latent = ref_lfim(r.z, r.z_lq, r.refined, r.pixels, lf_scale=released_lf, hf_scale=released_hf)
    return ref_decode_and_finish(pair.vae, latent, r.pixels, r.output_size, color_fix)


def _assert_output_close(output: torch.Tensor, expected: torch.Tensor) -> None:
    assert output.shape == (1, 3, 4 * LQ_SIZE[0], 4 * LQ_SIZE[1])
    assert float(output.min()) >= 0.0 and float(output.max()) <= 1.0
    assert_eight_bit_close(output, expected, max_levels=1, max_fraction=1e-3)


def test_upscale_with_released_defaults_matches_reference(
    pair: Pair, engine_latents: Latents, reference_latents: Latents
) -> None:
    """The whole ``upscale`` call (lf 0.2 / hf 0.2 released = 0.1 / 0.1 effective, AdaIN) against the reference,
    and against the engine's own public steps composed by hand (so the other cases may use the steps)."""
    low, high = _engine_settings(0.2, 0.2)
    assert (low.strength, high.strength) == (UpscaleSettings().lf.strength, UpscaleSettings().hf.strength)
    settings = UpscaleSettings(latent_mode="mode", color_fix="adain", lf=low, hf=high)
    with torch.no_grad():
        output = upscale(pair.model, _lq_image(), settings)
        composed = _engine_output_from_steps(pair, engine_latents, 0.2, 0.2, "adain")
    _assert_output_close(output, _reference_output(pair, reference_latents, 0.2, 0.2, "adain"))
    _close(output, composed, atol=1e-6)


def _engine_output_from_steps(
    pair: Pair, e: Latents, released_lf: float, released_hf: float, color_fix: str
) -> torch.Tensor:
    low, high = _engine_settings(released_lf, released_hf)
    gate = spatial_gate(e.pixels, tuple(e.z.shape[-2:]))
    final = inject_frequencies(e.z, e.z_lq, gate, low, high)
    with torch.no_grad():
        decoded = decode_latent(pair.model, final)
    return finish_image(decoded, e.pixels, e.output_size, color_fix)


@pytest.mark.parametrize(
    ("released_lf", "released_hf", "color_fix"),
    [(0.0, 0.0, "adain"), (0.2, 0.0, "adain"), (0.0, 0.2, "wavelet"), (0.2, 0.2, "wavelet")],
)
def test_output_matches_reference(
    pair: Pair,
    engine_latents: Latents,
    reference_latents: Latents,
    released_lf: float,
    released_hf: float,
    color_fix: str,
) -> None:
    output = _engine_output_from_steps(pair, engine_latents, released_lf, released_hf, color_fix)
    _assert_output_close(output, _reference_output(pair, reference_latents, released_lf, released_hf, color_fix))


def test_command_line_on_a_png_matches_reference(pair: Pair, reference_latents: Latents, tmp_path: Path) -> None:
    """``fidesr upscale`` on an 8-bit PNG with its defaults (released lf 0.2 / hf 0.2, AdaIN) writes the
    released computation's output, and exactly what ``upscale`` returns for the same file."""
    array = (_lq_image()[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "photo.png")
    args = ["upscale", tmp_path / "photo.png", "-o", tmp_path / "out", "--base", pair.folder / "base"]
    args += ["--weights", pair.folder / "fidesr.pkl", "--precision", "fp32", "--device", "cpu", "--latent-mode", "mode"]
    assert cli.main([str(arg) for arg in args]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "photo.png").convert("RGB"))
    output = torch.from_numpy(written.copy()).permute(2, 0, 1)[None].float() / 255
    _assert_output_close(output, _reference_output(pair, reference_latents, 0.2, 0.2, "adain"))
    with torch.no_grad():
        direct = upscale(pair.model, _lq_image(), UpscaleSettings(latent_mode="mode"))
    assert torch.equal(output, direct)


def test_float_input_keeps_the_float_path(pair: Pair) -> None:
    """An LQ that is not 8-bit values (a 16-bit file, another node's floats) is resized and finished in float,
    against the float reference, with no rounding to 8 bits."""
    image = _lq_image(eight_bit=False)
    off = {"lf": LowFrequencySettings(strength=0.0), "hf": HighFrequencySettings(strength=0.0)}
    settings = UpscaleSettings(latent_mode="mode", color_fix="adain", **off)
    assert prepare_lq(image).eight_bit == (False,)
    with torch.no_grad():
        output = upscale(pair.model, image, settings)
    pixels, output_size = ref_prepare_lq(image)
    _, _, z = ref_restored_latent(pair.unet, pair.vae, pair.lrrb_state, pair.embedding, pixels)
    expected = ref_decode_and_finish(pair.vae, z, pixels, output_size, "adain")
    _close(output, expected, atol=1e-4)
    assert not torch.equal(output * 255, (output * 255).round())


def test_other_scale_matches_reference(pair: Pair) -> None:
    """x2 on an 8-bit image: the released threshold 512 // 2 = 256 (pre-scale 64x100 -> 256x400), x2, same finishing."""
    image = _lq_image(seed=1, size=(64, 100))
    off = {"lf": LowFrequencySettings(strength=0.0), "hf": HighFrequencySettings(strength=0.0)}
    with torch.no_grad():
        output = upscale(pair.model, image, UpscaleSettings(latent_mode="mode", upscale_by=2.0, **off))
    pixels, output_size = ref_prepare_lq(image, upscale=2)
    assert pixels.shape[-2:] == (512, 800) and output_size == (128, 200)
    _, _, z = ref_restored_latent(pair.unet, pair.vae, pair.lrrb_state, pair.embedding, pixels)
    expected = ref_decode_and_finish(pair.vae, z, pixels, output_size, "adain")
    assert output.shape == (1, 3, 128, 200)
    assert_eight_bit_close(output, expected, max_levels=1, max_fraction=1e-3)


# --------------------------------------------------------------------- tiling


@pytest.mark.parametrize(("latent_size", "tile", "overlap"), [((18, 30), 12, 4), ((20, 28), 16, 6)])
def test_tiled_unet_matches_reference_tiler(pair: Pair, latent_size: tuple[int, int], tile: int, overlap: int) -> None:
    """The engine's tiled U-Net pass equals the reference tiler around the reference (peft) U-Net."""
    z_lq = torch.randn(1, 4, *latent_size, generator=torch.Generator().manual_seed(3))
    timestep = torch.tensor([1], dtype=torch.long)

    def unet_fn(latent: torch.Tensor) -> torch.Tensor:
        return pair.unet(latent, timestep, encoder_hidden_states=pair.embedding).sample

    with torch.no_grad():
        got = predict_residual(pair.model, z_lq, tile_size=tile, tile_overlap=overlap)
        expected = ref_tiled(unet_fn, z_lq, tile, overlap)
        untiled = unet_fn(z_lq)
    _close(got, expected, atol=1e-5 * max(float(expected.abs().max()), 1.0))
    assert float((expected - untiled).abs().max()) > 1e-4  # tiling really changed something


def test_lrrb_on_stitched_residual_vs_released_per_tile(pair: Pair) -> None:
    """The engine refines the stitched residual once; the released code refines each tile, then blends.

    Without tiling both are the same (the latent tests above); with tiling they differ near
    tile seams, a documented choice.  The size of that difference is printed for the report.
    """
    z_lq = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(4))
    timestep = torch.tensor([1], dtype=torch.long)

    def unet_then_lrrb(latent: torch.Tensor) -> torch.Tensor:
        residual = pair.unet(latent, timestep, encoder_hidden_states=pair.embedding).sample
        return residual + ref_lrrb(pair.lrrb_state, torch.cat([latent, residual], dim=1))

    with torch.no_grad():
        residual = predict_residual(pair.model, z_lq, tile_size=16, tile_overlap=6)
        engine_refined = refine_residual(pair.model, z_lq, residual)
        stitched_refined = residual + ref_lrrb(pair.lrrb_state, torch.cat([z_lq, residual], dim=1))
        per_tile_refined = ref_tiled(unet_then_lrrb, z_lq, 16, 6)
    _close(engine_refined, stitched_refined, atol=1e-5)
    gap = float((engine_refined - per_tile_refined).abs().max())
    print(f"stitched-LRRB vs released per-tile LRRB: max |Δ| = {gap:.3g} (residual scale {residual.abs().max():.3g})")
    assert gap > 0.0


# ------------------------------------------------------------ robustness and sizes


def test_extreme_inputs_give_finite_outputs(pair: Pair) -> None:
    size = (32, 32)
    black = torch.zeros(1, 3, *size)
    white = torch.ones(1, 3, *size)
    single = torch.tensor([0.8, 0.2, 0.4]).view(1, 3, 1, 1).expand(1, 3, *size).clone()
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    checker = ((yy + xx) % 2).float().expand(1, 3, *size)
    checker = (checker + 0.3 * torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    batch = torch.cat([black, white, single, checker])
    with torch.no_grad():
        output = upscale(pair.model, batch, UpscaleSettings(latent_mode="mode"))
    assert output.shape == (4, 3, 128, 128)
    assert torch.isfinite(output).all()
    assert float(output.min()) >= 0.0 and float(output.max()) <= 1.0


@pytest.mark.parametrize(("size", "expected"), [((1, 1), (4, 4)), ((7, 13), (28, 52))])
def test_tiny_inputs_give_requested_output_size(pair: Pair, size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        output = upscale(pair.model, image, UpscaleSettings(latent_mode="mode"))
    assert output.shape == (1, 3, *expected)
    assert torch.isfinite(output).all()
