"""The ComfyUI node chain (Encode -> One-Step U-Net -> LRRB -> LF -> HF -> Decode) against the engine.

Tiny random models through the entry point ComfyUI calls; fixtures in ``conftest.py``.
"""

from __future__ import annotations

import torch
from node_helpers import chain, run_node


def test_chain_equals_fidesr_upscale_and_the_engine_pipeline(comfy, handle, lq_image, default_chain) -> None:
    (one_node,) = run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image)
    assert torch.equal(one_node, default_chain["image"])
    assert one_node.shape == (1, 128, 128, 3) and one_node.dtype == torch.float32
    assert 0.0 <= one_node.min() and one_node.max() <= 1.0
    pipeline = comfy.module("fidesr_core.pipeline")
    with torch.inference_mode():
        engine = pipeline.upscale(
            handle.model, lq_image.permute(0, 3, 1, 2), comfy.module("fidesr_core.settings").UpscaleSettings()
        )
    # One composition: the node is a call of the engine's upscale, the chain runs its steps one by one.
    assert torch.equal(one_node, engine.permute(0, 2, 3, 1))


def test_chain_with_tiling_batch_and_strengths_equals_fidesr_upscale(comfy, handle, lq_images) -> None:
    settings = {"upscale_by": 3.0, "latent_mode": "mode", "seed": 5, "tile_size": 48, "tile_overlap": 16}
    image = lq_images
    overrides = {
        "encode": {"upscale_by": 3.0, "latent_mode": "mode", "seed": 5},
        "residual": {"tile_size": 48, "tile_overlap": 16},
        "lf": {"strength": 0.3},
        "hf": {"strength": 0.0},
    }
    chained = chain(comfy, handle, image, **overrides)
    (one_node,) = run_node(
        comfy, "FiDeSRUpscale", model=handle, image=image, lf_strength=0.3, hf_strength=0.0, **settings
    )
    assert torch.equal(one_node, chained["image"])
    assert one_node.shape == (2, 96, 96, 3)
    assert not torch.allclose(one_node[0], one_node[1])


def test_latent_is_a_comfyui_latent_of_unscaled_vae_latents(comfy, handle, lq_image) -> None:
    (latent,) = run_node(comfy, "FiDeSREncode", model=handle, image=lq_image, latent_mode="mode")
    samples = latent["samples"]
    assert samples.shape == (1, 4, 64, 64) and samples.dtype == torch.float32 and samples.device.type == "cpu"
    # What ComfyUI's VAEEncode would give: the plain VAE posterior mode of the network input.
    preprocess = comfy.module("fidesr_core.ops.preprocess")
    pixels = preprocess.prepare_lq(lq_image.permute(0, 3, 1, 2), upscale_by=4.0).pixels
    with torch.inference_mode():
        mode = handle.model.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(samples, mode, atol=1e-4, rtol=1e-4)
    latents = latent["fidesr"].latents
    torch.testing.assert_close(latents.z_lq, mode * handle.model.scaling_factor, atol=1e-4, rtol=1e-4)
    assert latents.output_size == (128, 128) and latents.reference.shape == (1, 3, 512, 512)


def test_each_step_outputs_its_documented_latent(comfy, handle, default_chain) -> None:
    sf = handle.model.scaling_factor
    z_lq, r = default_chain["residual"]["fidesr"].latents.z_lq, default_chain["residual"]["fidesr"].latents.residual
    r_tilde = default_chain["refined"]["fidesr"].latents.residual
    torch.testing.assert_close(default_chain["encoded"]["samples"] * sf, z_lq)
    torch.testing.assert_close(default_chain["residual"]["samples"] * sf, z_lq - r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default_chain["refined"]["samples"] * sf, z_lq - r_tilde, atol=1e-5, rtol=1e-5)
    restoration = comfy.module("fidesr_core.ops.restoration")
    with torch.inference_mode():
        expected_refined = restoration.refine_residual(handle.model, z_lq, r)
    torch.testing.assert_close(r_tilde, expected_refined)
    assert not torch.allclose(r_tilde, r)  # the tiny LRRB is not zero
    assert default_chain["hf"]["fidesr"].stages == ("encode", "residual", "refine", "lf", "hf")


def test_injections_commute_and_add_their_engine_deltas(comfy, handle, default_chain) -> None:
    refined = default_chain["refined"]
    (hf_first,) = run_node(comfy, "FiDeSRHighFrequencyInject", latent=refined, strength=0.2)
    (both,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=hf_first, strength=0.3)
    (lf_first,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=refined, strength=0.3)
    (both_other_order,) = run_node(comfy, "FiDeSRHighFrequencyInject", latent=lf_first, strength=0.2)
    assert torch.equal(both["samples"], both_other_order["samples"])  # the state sums the deltas in one order
    injection, settings = comfy.module("fidesr_core.ops.injection"), comfy.module("fidesr_core.settings")
    latents = refined["fidesr"].latents
    z = latents.z_lq - latents.residual
    gate = injection.spatial_gate(latents.reference, tuple(z.shape[-2:]))
    expected = injection.inject_frequencies(
        z,
        latents.z_lq,
        gate,
        settings.LowFrequencySettings(strength=0.3),
        settings.HighFrequencySettings(strength=0.2),
    )
    torch.testing.assert_close(both["samples"] * handle.model.scaling_factor, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both["samples"], refined["samples"])


def test_positive_conditioning_replaces_the_empty_prompt(comfy, handle, default_chain) -> None:
    encoded = default_chain["encoded"]
    empty = [[handle.model.prompt_embedding.clone(), {"pooled_output": None}]]
    (with_empty,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, positive=empty)
    assert torch.equal(with_empty["samples"], default_chain["residual"]["samples"])
    generator = torch.Generator().manual_seed(3)
    prompt = [[torch.randn((1, 77, handle.cross_attention_dim), generator=generator), {}]]
    (with_prompt,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, positive=prompt)
    assert not torch.allclose(with_prompt["samples"], with_empty["samples"])


def test_color_fix_node_resizes_the_reference_and_broadcasts_it(comfy, lq_image, default_chain) -> None:
    image = torch.cat([default_chain["image"], default_chain["image"].flip(1)])  # a batch of 2
    (fixed,) = run_node(comfy, "FiDeSRColorFix", image=image, reference=lq_image, method="adain")
    assert fixed.shape == image.shape
    color_fix = comfy.module("fidesr_core.ops.color_fix")
    preprocess = comfy.module("fidesr_core.ops.preprocess")
    reference = preprocess.resize_image(lq_image.permute(0, 3, 1, 2), (128, 128)).expand(2, -1, -1, -1)
    expected = color_fix.apply_color_fix(image.permute(0, 3, 1, 2), reference, "adain").permute(0, 2, 3, 1)
    torch.testing.assert_close(fixed, expected)
    (wavelet,) = run_node(comfy, "FiDeSRColorFix", image=image, reference=lq_image, method="wavelet")
    assert wavelet.shape == image.shape and not torch.allclose(wavelet, fixed)
