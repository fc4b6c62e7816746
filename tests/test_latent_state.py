"""The engine's step state machine (``fidesr_core.latent_state``) and the steps of ``latent_steps`` without ComfyUI.

Tiny random model from ``conftest.py``; the pipeline's one call and its steps one by one must agree
bit for bit, the order checks speak of steps, and a runner can cut a batch into chunks.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fidesr_core.errors import StepOrderError
from fidesr_core.latent_state import mismatched_images
from fidesr_core.latent_steps import decode_step, encode_step, injection_step, refine_step, residual_step
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.networks.model import OneStepRestorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_pisa_sr_weights
from fidesr_core.ops.injection import HighFrequencySettings, LowFrequencySettings
from fidesr_core.pipeline import UpscaleSettings, upscale
from fidesr_core.step_runner import Attempt, StepRunner

SMALL = 64  # processing size: 16 px inputs become 64 px, 8 x 8 latents (the tiny U-Net is slow at 64 x 64)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(11))


def _steps(model, image: torch.Tensor, *, runner=None, hf_first: bool = False) -> torch.Tensor:
    state = encode_step(model, image, process_size=SMALL, runner=runner)
    state = refine_step(model, residual_step(model, state, runner=runner), runner=runner)
    branches = [LowFrequencySettings(), HighFrequencySettings()]
    for settings in reversed(branches) if hf_first else branches:
        state = injection_step(state, settings, runner=runner)
    return decode_step(model, state, runner=runner)


def test_steps_one_by_one_equal_upscale_in_either_injection_order(tiny_model, images) -> None:
    with torch.inference_mode():
        whole = upscale(tiny_model, images[:1], UpscaleSettings(process_size=SMALL))
        assert torch.equal(_steps(tiny_model, images[:1]), whole)
        assert torch.equal(_steps(tiny_model, images[:1], hf_first=True), whole)


class ChunkingRunner(StepRunner):
    """One image at a time, every step: what a memory manager does when little memory is free."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], int]] = []

    def run(self, call, work):
        self.calls.append((call.step, call.networks, call.batch_size))
        return work(Attempt(device=call.weights_device, tile_size=call.tile_size, images_per_chunk=1))


def test_a_runner_can_cut_the_batch_with_each_image_as_alone(tiny_model, images) -> None:
    runner = ChunkingRunner()
    settings = UpscaleSettings(latent_mode="sample", seed=4, process_size=SMALL)
    with torch.inference_mode():
        chunked = upscale(tiny_model, images, settings, runner=runner)
        alone = torch.cat([upscale(tiny_model, image[None], settings) for image in images])
    torch.testing.assert_close(chunked, alone, atol=1e-5, rtol=0)
    assert [step for step, _, _ in runner.calls] == ["encode", "residual", "refine", "lf", "hf", "decode"]
    assert [networks for _, networks, _ in runner.calls] == [("vae",), ("unet",), ("lrrb",), (), (), ("vae",)]


def test_order_checks_name_the_steps(tiny_model, images) -> None:
    with torch.inference_mode():
        encoded = encode_step(tiny_model, images[:1], process_size=SMALL)
        with pytest.raises(StepOrderError, match="has not been through the U-Net residual step yet"):
            injection_step(encoded, LowFrequencySettings())
        residual = residual_step(tiny_model, encoded)
        with pytest.raises(StepOrderError, match="already went through the U-Net residual step"):
            residual_step(tiny_model, residual)
        injected = injection_step(residual, HighFrequencySettings())
        with pytest.raises(StepOrderError, match="put the LRRB refine step before the LF injection"):
            refine_step(tiny_model, injected)
        names = {"encode": "E", "residual": "U", "refine": "R", "lf": "L", "hf": "H", "decode": "D"}
        with pytest.raises(StepOrderError, match="^the latent already went through R; connect the output of U"):
            refine_step(tiny_model, refine_step(tiny_model, residual), names=names)
    assert encoded.gate is not None and injected.gate is encoded.gate  # the gate is computed once


@pytest.fixture(scope="module")
def tiny_pisa_sr() -> OneStepRestorer:
    """A tiny PiSA-SR model (no LRRB), fp32 on the CPU, on the same base as ``tiny_model``."""
    base = tiny_base_model(seed=1)
    return assemble_restorer(base, tiny_pisa_sr_weights(base, seed=4), precision="fp32", device="cpu")


def test_refine_passes_a_latent_without_lrrb_through(tiny_pisa_sr, images) -> None:
    pisa = tiny_pisa_sr
    with torch.inference_mode():
        encoded = encode_step(pisa, images[:1], process_size=SMALL)
        assert encoded.recipe is pisa.recipe
        with pytest.raises(StepOrderError, match="put the LRRB refine step after the U-Net residual step"):
            refine_step(pisa, encoded)
        state = residual_step(pisa, encoded)
        assert refine_step(pisa, state) is state
        injected = injection_step(state, LowFrequencySettings())
        assert refine_step(pisa, injected) is injected  # a step that does nothing may stand anywhere after the U-Net
        result = upscale(pisa, images[:1], UpscaleSettings(process_size=SMALL))
        expected = decode_step(pisa, injection_step(injected, HighFrequencySettings()))
    assert torch.equal(result, expected)


def test_steps_refuse_a_latent_of_another_family(tiny_model, tiny_pisa_sr, images) -> None:
    with torch.inference_mode():
        pisa_state = encode_step(tiny_pisa_sr, images[:1], process_size=SMALL)
        with pytest.raises(StepOrderError, match="by the PiSA-SR model but the U-Net residual step got the FiDeSR"):
            residual_step(tiny_model, pisa_state)
        fidesr_state = residual_step(tiny_model, encode_step(tiny_model, images[:1], process_size=SMALL))
        with pytest.raises(StepOrderError, match="by the FiDeSR model but the LRRB refine step got the PiSA-SR"):
            refine_step(tiny_pisa_sr, fidesr_state)


def test_samples_from_other_images_are_refused_and_edits_kept(tiny_model, images) -> None:
    with torch.inference_mode():
        state = residual_step(tiny_model, encode_step(tiny_model, images, latent_mode="mode", process_size=SMALL))
    samples = state.samples
    assert state.accept_samples(samples) is state and state.accept_samples(samples.clone()) is state
    edited = state.accept_samples(samples * 1.05)
    torch.testing.assert_close(edited.latent(), samples * 1.05 * state.scaling_factor, atol=1e-5, rtol=1e-5)
    with pytest.raises(StepOrderError, match="images 1, 2 of 2 are not the images"):
        state.accept_samples(samples.flip(0))
    with pytest.raises(StepOrderError, match="shape"):
        state.accept_samples(samples[:1])
    assert mismatched_images(samples, samples + 0.01 * torch.randn_like(samples)) == []
    flat = torch.zeros_like(samples)
    assert mismatched_images(flat, flat + 1.0) == []  # no layout to compare: accepted


def test_state_moves_between_devices_whole(tiny_model, images) -> None:
    with torch.inference_mode():
        state = encode_step(tiny_model, images[:1], process_size=SMALL)
    moved = replace(state).to("meta")
    assert {t.device.type for t in (moved.z_lq, moved.upscaled_lq, moved.gate, moved.samples)} == {"meta"}
    assert state.z_lq.device.type == "cpu"
