"""The engine's flow (``fidesr_core.pipeline``) stage by stage, and how it runs (``fidesr_core.runtime``).

Tiny random models from ``conftest.py``: the one call and its stages one by one agree bit for bit,
a runtime can cut a batch into chunks, the refine stage passes latents of a model without an LRRB,
and running out of memory is recovered in the engine (fewer images, then smaller tiles, then an
error that says what to change).
"""

from __future__ import annotations

import logging

import pytest
import torch

from fidesr_core import pipeline
from fidesr_core.errors import OutOfMemory
from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.networks.model import OneStepRestorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_pisa_sr_weights
from fidesr_core.pipeline import (
    decode_stage,
    encode_stage,
    injection_stage,
    refine_stage,
    residual_stage,
    upscale,
)
from fidesr_core.runtime import Runtime
from fidesr_core.settings import HighFrequencySettings, LowFrequencySettings, UpscaleSettings

SMALL = UpscaleSettings(process_size=64)  # 16 px inputs become 64 px, 8 x 8 latents (the tiny U-Net is slow at 64²)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(11))


def _stages(model, image: torch.Tensor, settings=SMALL, runtime=None, *, hf_first: bool = False) -> torch.Tensor:
    latents = encode_stage(model, image, settings, runtime)
    latents = refine_stage(model, residual_stage(model, latents, settings, runtime), runtime)
    branches = [LowFrequencySettings(), HighFrequencySettings()]
    for branch in reversed(branches) if hf_first else branches:
        latents = injection_stage(latents, branch, runtime)
    return decode_stage(model, latents, settings, runtime)


def test_stages_one_by_one_equal_upscale_in_either_injection_order(tiny_model, images) -> None:
    with torch.inference_mode():
        whole = upscale(tiny_model, images[:1], SMALL)
        assert torch.equal(_stages(tiny_model, images[:1]), whole)
        assert torch.equal(_stages(tiny_model, images[:1], hf_first=True), whole)


class OneAtATime(Runtime):
    """What a memory manager does when little memory is free: one image per chunk, every stage."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[str, ...], int]] = []

    def device(self, networks, weights_device, working_bytes):
        self.calls.append((tuple(networks), working_bytes))
        return weights_device

    def images_at_once(self, device, working_bytes, batch):
        return 1


def test_a_runtime_can_cut_the_batch_with_each_image_as_alone(tiny_model, images) -> None:
    runtime, progress = OneAtATime(), []
    runtime.progress = lambda stage, done, total: progress.append((stage, done, total))
    settings = UpscaleSettings(latent_mode="sample", seed=4, process_size=64)
    with torch.inference_mode():
        chunked = upscale(tiny_model, images, settings, runtime=runtime)
        alone = torch.cat([upscale(tiny_model, image[None], settings) for image in images])
    torch.testing.assert_close(chunked, alone, atol=1e-5, rtol=0)
    assert [networks for networks, _ in runtime.calls] == [("vae",), ("unet",), ("lrrb",), (), (), ("vae",)]
    assert all(working_bytes > 0 for _, working_bytes in runtime.calls)
    finals = {stage: (done, total) for stage, done, total in progress}
    assert list(finals) == ["encode", "residual", "refine", "lf", "hf", "decode"]
    assert all(done == total for done, total in finals.values()) and finals["refine"] == (2, 2)  # over the batch


@pytest.fixture(scope="module")
def tiny_pisa_sr() -> OneStepRestorer:
    """A tiny PiSA-SR model (no LRRB), fp32 on the CPU."""
    base = tiny_base_model(seed=1)
    return assemble_restorer(base, tiny_pisa_sr_weights(base, seed=4), precision="fp32", device="cpu")


def test_refine_passes_latents_of_a_model_without_lrrb(tiny_pisa_sr, images) -> None:
    with torch.inference_mode():
        latents = residual_stage(tiny_pisa_sr, encode_stage(tiny_pisa_sr, images[:1], SMALL), SMALL)
        assert refine_stage(tiny_pisa_sr, latents) is latents
        assert torch.equal(_stages(tiny_pisa_sr, images[:1]), upscale(tiny_pisa_sr, images[:1], SMALL))


def test_refine_needs_the_residual(tiny_model, images) -> None:
    with torch.inference_mode(), pytest.raises(ValueError, match="residual stage"):
        refine_stage(tiny_model, encode_stage(tiny_model, images[:1], SMALL))


def test_injection_computes_the_gate_when_encode_did_not(tiny_model, images) -> None:
    with torch.inference_mode():
        with_gate = encode_stage(tiny_model, images[:1], SMALL)
        without = encode_stage(tiny_model, images[:1], SMALL, with_gate=False)
        assert without.gate is None and with_gate.gate.shape == (1, 1, 8, 8)
        with_gate, without = (residual_stage(tiny_model, latents, SMALL) for latents in (with_gate, without))
        late = injection_stage(without, LowFrequencySettings())
        early = injection_stage(with_gate, LowFrequencySettings())
    assert torch.equal(late.gate, with_gate.gate) and torch.equal(late.latent(), early.latent())
    assert injection_stage(early, HighFrequencySettings()).gate is early.gate  # computed once


def _running_out(times: int, calls: list[tuple[int, int]], real):
    def predict(model, z_lq, **kwargs):
        calls.append((z_lq.shape[0], kwargs["tile_size"]))
        if len(calls) <= times:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, z_lq, **kwargs)

    return predict


def test_out_of_memory_takes_fewer_images_then_smaller_tiles(tiny_model, images, monkeypatch, caplog) -> None:
    calls: list[tuple[int, int]] = []
    settings = UpscaleSettings(process_size=256, tile_size=32, tile_overlap=8)  # 32 x 32 latents
    with torch.inference_mode():
        expected = upscale(tiny_model, images, UpscaleSettings(process_size=256, tile_size=16, tile_overlap=4))
        monkeypatch.setattr(pipeline, "predict_residual", _running_out(2, calls, pipeline.predict_residual))
        with caplog.at_level(logging.WARNING):
            recovered = upscale(tiny_model, images, settings)
    assert calls[:4] == [(2, 32), (1, 32), (1, 16), (1, 16)]  # fewer images first, then half the tile
    assert "the residual stage ran out of memory with tile 32 and 2 image(s) at a time" in caplog.text
    torch.testing.assert_close(recovered, expected, atol=1e-5, rtol=0)  # the retry's tiles give the retry's result


def test_out_of_memory_at_the_smallest_tile_says_what_to_change(tiny_model, images, monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(pipeline, "predict_residual", _running_out(99, calls, pipeline.predict_residual))
    with torch.inference_mode(), pytest.raises(OutOfMemory) as caught:
        upscale(tiny_model, images[:1], UpscaleSettings(process_size=256, tile_size=0, tile_overlap=0))
    assert [tile for _, tile in calls] == [0, 16]  # 0 = untiled: half the 32-px latent; 16 is the floor
    assert str(caught.value).startswith("the residual stage ran out of memory with tiles of 16 latent pixels")
    assert "lower precision" in str(caught.value)

    def other_error(model, z_lq, **kwargs):
        calls.append((1, kwargs["tile_size"]))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    calls.clear()
    monkeypatch.setattr(pipeline, "predict_residual", other_error)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="mat1"):
        upscale(tiny_model, images[:1], SMALL)
    assert calls == [(1, 96)]  # no retry for errors other than out of memory


def test_latents_move_between_devices_whole(tiny_model, images) -> None:
    with torch.inference_mode():
        latents = residual_stage(tiny_model, encode_stage(tiny_model, images[:1], SMALL), SMALL)
    moved = latents.to("meta")
    assert {t.device.type for t in (moved.z_lq, moved.reference, moved.gate, moved.residual)} == {"meta"}
    assert moved.lf_delta is None and latents.z_lq.device.type == "cpu"
