"""The errors the ComfyUI nodes report: wrong latents, steps out of order, bad values.

Every message names the node, the value and what was expected; fixtures in ``conftest.py``.
"""

from __future__ import annotations

import torch
from node_helpers import error_of, run_node


def test_plain_latent_into_a_fidesr_node_names_the_node_to_connect(comfy, handle) -> None:
    plain = {"samples": torch.zeros((1, 4, 8, 8))}
    message = error_of(comfy, "FiDeSRLowFrequencyInject", latent=plain)
    assert message.startswith("FiDeSR LF Injection: the latent has no FiDeSR state")
    assert "FiDeSR LRRB Refine" in message
    message = error_of(comfy, "FiDeSRResidual", model=handle, latent=plain, tile_size=96, tile_overlap=32)
    assert message.startswith("FiDeSR One-Step U-Net:") and "FiDeSR VAE Encode" in message
    message = error_of(comfy, "FiDeSRDecode", model=handle, latent=plain, color_fix="adain", tile_size=224)
    assert message.startswith("FiDeSR VAE Decode:") and "VAE Decode" in message


def test_state_that_no_longer_matches_samples_is_refused(comfy, handle, default_chain) -> None:
    resized = dict(default_chain["refined"])
    resized["samples"] = torch.nn.functional.interpolate(resized["samples"], scale_factor=2.0)
    message = error_of(comfy, "FiDeSRHighFrequencyInject", latent=resized)
    assert message.startswith("FiDeSR HF Injection:") and "[1, 4, 128, 128]" in message and "[1, 4, 64, 64]" in message
    samples = default_chain["refined"]["samples"]
    rebatched = dict(default_chain["refined"], samples=torch.cat([samples, samples]))
    message = error_of(comfy, "FiDeSRDecode", model=handle, latent=rebatched, color_fix="none", tile_size=224)
    assert message.startswith("FiDeSR VAE Decode:") and "batch" in message


def test_steps_out_of_order_are_refused(comfy, handle, default_chain) -> None:
    message = error_of(comfy, "FiDeSRLowFrequencyInject", latent=default_chain["encoded"])
    assert "has not been through FiDeSR One-Step U-Net" in message
    message = error_of(comfy, "FiDeSRRefine", model=handle, latent=default_chain["encoded"])
    assert message.startswith("FiDeSR LRRB Refine:") and "One-Step U-Net" in message
    (injected_unrefined,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=default_chain["residual"])
    message = error_of(comfy, "FiDeSRRefine", model=handle, latent=injected_unrefined)
    assert "put FiDeSR LRRB Refine before FiDeSR LF Injection" in message
    message = error_of(comfy, "FiDeSRRefine", model=handle, latent=default_chain["refined"])
    assert "already went through FiDeSR LRRB Refine" in message
    message = error_of(
        comfy, "FiDeSRResidual", model=handle, latent=default_chain["residual"], tile_size=96, tile_overlap=32
    )
    assert "already went through FiDeSR One-Step U-Net" in message


def test_bad_values_are_reported_with_node_value_and_expectation(comfy, handle, lq_image, default_chain) -> None:
    message = error_of(
        comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=32, tile_overlap=32
    )
    assert message == "FiDeSR One-Step U-Net: tile_overlap must be smaller than tile_size (32), got 32"
    wrong_clip = [[torch.zeros((1, 77, 768)), {}]]
    message = error_of(
        comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=96, positive=wrong_clip
    )
    assert message.startswith("FiDeSR One-Step U-Net: positive is a [1, 77, 768] embedding") and "CLIP" in message
    # An engine error (SettingsError) is re-raised under the node's name.
    message = error_of(comfy, "FiDeSREncode", model=handle, image=lq_image, upscale_by=20.0)
    assert message.startswith("FiDeSR VAE Encode:") and "upscale_by" in message and "20" in message
    message = error_of(comfy, "FiDeSRColorFix", image=lq_image, reference=lq_image[:1].expand(3, -1, -1, -1))
    assert message.startswith("FiDeSR Color Fix: reference has a batch of 3")
    message = error_of(comfy, "FiDeSRUpscale", model="not a model", image=lq_image)
    assert message.startswith("FiDeSR Upscale: model must come from Load FiDeSR Model")


def test_a_latent_of_other_images_with_the_same_shape_is_refused(comfy, handle, lq_images) -> None:
    (encoded,) = run_node(comfy, "FiDeSREncode", model=handle, image=lq_images, latent_mode="mode")
    (residual,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=0, tile_overlap=0)
    swapped = dict(residual, samples=residual["samples"].flip(0))  # e.g. a batch node re-ordered the images
    message = error_of(comfy, "FiDeSRRefine", model=handle, latent=swapped)
    assert message.startswith("FiDeSR LRRB Refine: images 1, 2 of 2 are not the images the latent's FiDeSR state")
    assert "Connect FiDeSR LRRB Refine directly to the output of FiDeSR One-Step U-Net" in message
    (other,) = run_node(comfy, "FiDeSREncode", model=handle, image=lq_images.flip(2), latent_mode="mode")
    replaced = dict(encoded, samples=other["samples"])  # same shape, another picture
    message = error_of(comfy, "FiDeSRResidual", model=handle, latent=replaced, tile_size=0, tile_overlap=0)
    assert "images 1, 2 of 2 are not the images" in message
    one_replaced = dict(encoded, samples=torch.cat([encoded["samples"][:1], other["samples"][1:]]))
    message = error_of(comfy, "FiDeSRResidual", model=handle, latent=one_replaced, tile_size=0, tile_overlap=0)
    assert "image 2 of 2 is not the image the latent's FiDeSR state was made for" in message


def test_an_edit_made_between_nodes_is_kept(comfy, handle, default_chain) -> None:
    refined = default_chain["refined"]
    edited = dict(refined, samples=refined["samples"] * 1.1)  # e.g. ComfyUI's LatentMultiply
    (injected,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=edited)
    (plain,) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=refined)
    # The LF delta comes from the state, and the edit rides along.
    delta = plain["samples"] - refined["samples"]
    torch.testing.assert_close(injected["samples"], edited["samples"] + delta, atol=1e-5, rtol=1e-5)
    (image,) = run_node(comfy, "FiDeSRDecode", model=handle, latent=injected, color_fix="none", tile_size=224)
    (unedited,) = run_node(comfy, "FiDeSRDecode", model=handle, latent=plain, color_fix="none", tile_size=224)
    assert not torch.allclose(image, unedited)


def test_the_fingerprint_accepts_light_edits_and_flat_images(comfy) -> None:
    mismatched_images = comfy.module("nodes.chain").mismatched_images
    samples = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    assert mismatched_images(samples, samples + 0.01 * torch.randn_like(samples)) == []
    assert mismatched_images(samples, samples.flip(0)) == [0, 1]
    flat = torch.zeros_like(samples)
    assert mismatched_images(flat, flat + 1.0) == []  # no layout to compare: accepted
