"""CUDA checks (skipped without a GPU): the same tiny pipeline on the GPU agrees with the CPU.

Run on a machine with a GPU as part of ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import pytest
import torch

from fidesr_core.loading.assemble import assemble_fidesr_model
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights
from fidesr_core.pipeline import UpscaleSettings, upscale
from fidesr_core.tiled_vae.codec import decode_latents, encode_moments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(precision: str, device: str):
    base = tiny_base_model(seed=11)
    return assemble_fidesr_model(base, tiny_fidesr_weights(base, seed=12), precision=precision, device=device)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 2e-3), ("fp16", 3e-2), ("bf16", 6e-2)])
def test_gpu_pipeline_matches_cpu(precision: str, tolerance: float) -> None:
    image = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    settings = UpscaleSettings(latent_mode="sample", seed=5, tile_size=16, tile_overlap=4, decode_tile_size=16)
    on_cpu = upscale(_model("fp32", "cpu"), image, settings)
    on_gpu = upscale(_model(precision, "cuda"), image, settings)
    assert on_gpu.device.type == "cpu" and on_gpu.shape == on_cpu.shape
    assert torch.isfinite(on_gpu).all()
    assert (on_gpu - on_cpu).abs().mean() < tolerance


def test_tiled_vae_on_gpu_parks_maps_on_cpu_and_matches() -> None:
    vae = tiny_base_model(seed=13).vae.cuda()
    pixels = torch.rand(1, 3, 96, 128, device="cuda") * 2 - 1
    with torch.no_grad():
        whole = vae.encode(pixels).latent_dist.parameters
        tiled = encode_moments(vae, pixels, tile_size=32)
        latents = whole[:, :4]
        torch.cuda.reset_peak_memory_stats()
        decoded = decode_latents(vae, latents, tile_size=4)
    assert tiled.device.type == "cuda" and decoded.device.type == "cuda"
    assert (tiled - whole).abs().max() < 0.2 * whole.abs().max()
    assert torch.isfinite(decoded).all()


def test_model_moves_between_devices() -> None:
    model = _model("fp16", "cuda")
    assert model.device.type == "cuda" and model.dtype == torch.float16
    model.to("cpu")
    assert model.device.type == "cpu" and next(model.lrrb.parameters()).device.type == "cpu"
    model.to("cuda")
    assert model.prompt_embedding.device.type == "cuda"
