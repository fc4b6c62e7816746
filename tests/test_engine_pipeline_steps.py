"""Unit behaviour of the engine's pipeline steps that the parity tests do not pin down.

Colour fix, pre-processing (sizes, ranges, resizing, the empty-prompt tokens) and the
steps backed by a tiny random model (assembly, VAE encode/decode, restoration, the
whole upscale): edge cases, validation, invariants, determinism and the plumbing
(stages, cancellation, seeds).  Latent tiling, filters, detail map and injection are
in ``test_engine_units.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fidesr_core.errors import Cancelled, ImageInputError, SettingsError, WeightsFileError
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.networks.model import OneStepRestorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights
from fidesr_core.ops.color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix
from fidesr_core.ops.preprocess import prepare_lq, processing_size, resize_image, resize_to_output
from fidesr_core.ops.restoration import predict_residual, refine_residual, restored_latent
from fidesr_core.ops.vae_codec import decode_latent, encode_image, latent_noise
from fidesr_core.pipeline import upscale
from fidesr_core.runtime import STAGES, Runtime
from fidesr_core.settings import UpscaleSettings

# ------------------------------------------------------------------ colour fix


def test_adain_transfers_mean_and_std() -> None:
    image = torch.rand(1, 3, 32, 32) * 0.2 + 0.4
    reference = torch.rand(1, 3, 32, 32) * 0.3 + 0.3
    out = adain_color_fix(image, reference)
    torch.testing.assert_close(out.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), reference.std(dim=(2, 3)), atol=1e-3, rtol=0)


def test_colour_fixes_survive_flat_images() -> None:
    flat = torch.full((1, 3, 16, 16), 0.5)
    reference = torch.rand(1, 3, 16, 16)
    for method in ("adain", "wavelet"):
        for a, b in ((flat, reference), (reference, flat), (flat, torch.zeros_like(flat))):
            out = apply_color_fix(a, b, method)  # type: ignore[arg-type]
            assert torch.isfinite(out).all() and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_wavelet_with_itself_is_identity_and_takes_reference_colour() -> None:
    image = torch.rand(1, 3, 40, 40)
    torch.testing.assert_close(wavelet_color_fix(image, image), image, atol=1e-6, rtol=0)
    tinted = (image * 0.5 + 0.4).clamp(0, 1)
    out = wavelet_color_fix(image, tinted)
    assert abs(float(out.mean()) - float(tinted.mean())) < 0.02
    assert float((out - image).abs().mean()) > 0.05


def test_apply_color_fix_none_and_validation() -> None:
    image = torch.rand(1, 3, 8, 8).half()
    out = apply_color_fix(image, torch.rand(1, 3, 4, 4), "none")
    assert out.dtype == torch.float32 and torch.equal(out, image.float())
    with pytest.raises(KeyError):  # UpscaleSettings refuses other names
        apply_color_fix(image.float(), image.float(), "histogram")  # type: ignore[arg-type]


# --------------------------------------------------------------- preprocessing


def test_short_side_follows_the_released_float_truncation() -> None:
    """For short sides 49, 98, 103, 107, int(128 / m · m) is 127 in floats: the released script's PIL size,
    which the engine reproduces (the network input is then 504 px on that side, after the multiple of 8)."""
    for short in (49, 98, 103, 107):
        assert int(128 / short * short) == 127
        (pre_h, pre_w), (proc_h, proc_w) = processing_size(short, 300)
        assert pre_h == 127 and pre_w == int(128 / short * 300)
        assert proc_h == 504
        (pre_h, pre_w), _ = processing_size(300, short)
        assert pre_w == 127
    assert processing_size(50, 300)[0] == (128, 768)  # int(128 / 50 · 50) is 128


def test_processing_size_other_scales_and_validation() -> None:
    assert processing_size(100, 300, upscale_by=2.0) == ((256, 768), (512, 1536))
    assert processing_size(300, 400, upscale_by=2.0) == ((300, 400), (600, 800))
    assert processing_size(257, 300, upscale_by=2.0) == ((257, 300), (512, 600))
    with pytest.raises(ImageInputError):
        processing_size(0, 10)
    with pytest.raises(SettingsError, match="^upscale_by must be"):  # checked once, by the settings
        UpscaleSettings(upscale_by=0.5)


def test_prepare_lq_range_sizes_and_validation() -> None:
    prepared = prepare_lq(torch.rand(2, 3, 7, 13) * 1.4 - 0.2)  # out-of-range input is clamped first
    assert prepared.pixels.shape == (2, 3, 512, 944)
    assert prepared.output_size == (28, 52)
    assert float(prepared.pixels.min()) >= -1.0 and float(prepared.pixels.max()) <= 1.0
    prepared = prepare_lq(torch.rand(1, 3, 210, 219), upscale_by=2.5)
    assert prepared.pixels.shape[-2:] == (520, 544) and prepared.output_size == (525, 548)
    with pytest.raises(ImageInputError):
        prepare_lq(torch.rand(1, 4, 16, 16))
    with pytest.raises(ImageInputError):
        prepare_lq(torch.rand(3, 16, 16))


def test_resize_helpers() -> None:
    image = torch.rand(1, 3, 10, 12)
    assert resize_image(image, (10, 12)) is image
    up = resize_to_output(image, (40, 48))
    assert up.shape == (1, 3, 40, 48) and float(up.min()) >= 0.0 and float(up.max()) <= 1.0


def test_empty_prompt_token_ids() -> None:
    from fidesr_core.loading.clip_tokenizer import prompt_ids

    ids = prompt_ids("")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :3].tolist() == [49406, 49407, 0] and int(ids[0, 2:].abs().sum()) == 0


# ------------------------------------------------- model-backed steps (tiny model)


@pytest.fixture(scope="module")
def model_and_vae(tiny_model: OneStepRestorer) -> tuple[OneStepRestorer, torch.nn.Module]:
    """The shared tiny model and a copy of its VAE to compare against."""
    return tiny_model, copy.deepcopy(tiny_model.vae)


def test_tiny_weights_leave_base_untouched_and_are_reproducible() -> None:
    base = tiny_base_model(seed=2)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    weights = tiny_fidesr_weights(base, seed=3)
    after = base.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = tiny_fidesr_weights(base, seed=3)
    lora, lora_again = weights.lora["unet"].state, again.lora["unet"].state
    assert all(torch.equal(lora[k], lora_again[k]) for k in lora)
    assert all(float(v.abs().max()) > 0 for v in weights.lrrb_state.values())


def test_assembled_model_has_merged_lora(model_and_vae: tuple[OneStepRestorer, torch.nn.Module]) -> None:
    model, _ = model_and_vae
    assert not any("lora" in name for name in model.unet.state_dict())
    assert model.prompt_embedding.shape == (1, 77, 32) and model.dtype == torch.float32


def test_assemble_rejects_wrong_lrrb() -> None:
    base = tiny_base_model(seed=4)
    weights = tiny_fidesr_weights(base, seed=4)
    weights.lrrb_state["out_conv.weight"] = torch.zeros(3, 64, 1, 1)
    with pytest.raises(WeightsFileError):
        assemble_restorer(base, weights, precision="fp32", device="cpu")


def test_encode_modes(model_and_vae: tuple[OneStepRestorer, torch.nn.Module]) -> None:
    model, vae = model_and_vae
    pixels = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        mode = encode_image(model, pixels, latent_mode="mode")
        sample = encode_image(model, pixels, latent_mode="sample", seed=5)
        again = encode_image(model, pixels, latent_mode="sample", seed=5)
        other = encode_image(model, pixels, latent_mode="sample", seed=6)
    assert mode.shape == (1, 4, 8, 6) and mode.dtype == torch.float32
    torch.testing.assert_close(mode, 0.18215 * posterior.mean, atol=1e-6, rtol=1e-5)
    expected = 0.18215 * (posterior.mean + posterior.std * latent_noise(posterior.mean.shape, 5))
    torch.testing.assert_close(sample, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(sample, again) and not torch.equal(sample, other)


def test_decode_latent_is_clamped_unit_range(model_and_vae: tuple[OneStepRestorer, torch.nn.Module]) -> None:
    model, vae = model_and_vae
    latent = torch.randn(2, 4, 6, 5) * 3
    with torch.no_grad():
        decoded = decode_latent(model, latent)
        expected = (vae.decode(latent / 0.18215).sample.clamp(-1, 1) + 1) / 2
    assert decoded.shape == (2, 3, 48, 40)
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=1e-5)


def test_restoration_steps(model_and_vae: tuple[OneStepRestorer, torch.nn.Module]) -> None:
    model, _ = model_and_vae
    z_lq = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        both = predict_residual(model, z_lq)
        first = predict_residual(model, z_lq[:1])
        refined = refine_residual(model, z_lq, both)
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)  # batch items are independent
    assert float((refined - both).abs().max()) > 1e-4  # the non-zero LRRB acts
    assert torch.equal(restored_latent(z_lq, refined), z_lq - refined)
    with pytest.raises(ValueError):
        predict_residual(model, z_lq, prompt_embedding=torch.zeros(1, 77, 16))
    custom = torch.randn(2, 77, 32)
    with torch.no_grad():
        per_item = predict_residual(model, z_lq, prompt_embedding=custom)
    assert not torch.allclose(per_item, both)


def test_upscale_stages_cancel_and_seed(model_and_vae: tuple[OneStepRestorer, torch.nn.Module]) -> None:
    model, _ = model_and_vae
    image = torch.rand(1, 3, 16, 16)
    stages: list[str] = []
    settings = UpscaleSettings(seed=7)
    out = upscale(model, image, settings, runtime=Runtime(progress=lambda stage, done, total: stages.append(stage)))
    assert out.shape == (1, 3, 64, 64) and out.device.type == "cpu"
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == list(STAGES)
    torch.testing.assert_close(upscale(model, image, settings), out)  # seeded sampling is reproducible
    with pytest.raises(Cancelled):
        upscale(model, image, settings, runtime=Runtime(should_cancel=lambda: True))


def test_upscale_settings_validation() -> None:
    with pytest.raises(SettingsError):
        UpscaleSettings(latent_mode="median")  # type: ignore[arg-type]
    with pytest.raises(SettingsError):
        UpscaleSettings(color_fix="histogram")  # type: ignore[arg-type]
    defaults = UpscaleSettings()
    assert (defaults.lf.strength, defaults.hf.strength) == (0.1, 0.1)  # released 0.2 / 0.2, merged 50/50
    assert (defaults.tile_size, defaults.tile_overlap) == (96, 32)
    assert (defaults.encode_tile_size, defaults.decode_tile_size) == (1024, 224)


def test_upscale_batch_items_are_independent(model_and_vae: tuple[OneStepRestorer, torch.nn.Module]) -> None:
    model, _ = model_and_vae
    images = torch.rand(2, 3, 16, 16)
    settings = UpscaleSettings(latent_mode="mode")
    both = upscale(model, images, settings)
    torch.testing.assert_close(both[1:], upscale(model, images[1:], settings), atol=2e-5, rtol=1e-4)
    assert F.mse_loss(both[0], both[1]) > 0


def test_process_size_sets_the_min_side_rule(model_and_vae: tuple[OneStepRestorer, torch.nn.Module]) -> None:
    model, _ = model_and_vae
    image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    seen: list[tuple[int, ...]] = []
    original = model.vae.encode

    def recording_encode(pixels: torch.Tensor):
        seen.append(tuple(pixels.shape))
        return original(pixels)

    model.vae.encode = recording_encode
    try:
        out = upscale(model, image, UpscaleSettings(latent_mode="mode", process_size=64))
        upscale(model, image, UpscaleSettings(latent_mode="mode"))
    finally:
        del model.vae.encode
    assert out.shape == (1, 3, 64, 96)  # always exactly 4x the input
    assert seen == [(1, 3, 64, 96), (1, 3, 512, 768)]  # 64 px keeps 16 px as it is; 512 px lifts it to 128
    with pytest.raises(SettingsError, match="process_size"):
        UpscaleSettings(process_size=4)
