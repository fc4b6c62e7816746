"""CUDA checks (skipped without a GPU): the same tiny pipeline on the GPU agrees with the CPU.

Run on a machine with a GPU as part of ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import pytest
import torch

from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights
from fidesr_core.pipeline import upscale
from fidesr_core.settings import UpscaleSettings
from fidesr_core.tiled_vae.budget import MemoryBudget
from fidesr_core.tiled_vae.codec import decode_latents, encode_moments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(precision: str, device: str):
    base = tiny_base_model(seed=11)
    return assemble_restorer(base, tiny_fidesr_weights(base, seed=12), precision=precision, device=device)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 2e-3), ("fp16", 3e-2), ("bf16", 6e-2)])
def test_gpu_pipeline_matches_cpu(precision: str, tolerance: float) -> None:
    image = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    settings = UpscaleSettings(latent_mode="sample", seed=5, tile_size=16, tile_overlap=4, decode_tile_size=16)
    on_cpu = upscale(_model("fp32", "cpu"), image, settings)
    on_gpu = upscale(_model(precision, "cuda"), image, settings)
    assert on_gpu.device.type == "cpu" and on_gpu.shape == on_cpu.shape
    assert torch.isfinite(on_gpu).all()
    assert (on_gpu - on_cpu).abs().mean() < tolerance


def test_tiled_vae_on_gpu_matches_the_stock_encode() -> None:
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


def test_tiled_vae_maps_on_the_gpu_in_ram_or_in_files_give_the_same_numbers() -> None:
    from fidesr_core.tiled_vae.maps import MapStore
    from fidesr_core.tiled_vae.program import decoder_program
    from fidesr_core.tiled_vae.runner import run_program

    vae = tiny_base_model(seed=14).vae.cuda().half().to(memory_format=torch.channels_last)
    latents = torch.randn(1, 4, 24, 20, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        on_gpu = decode_latents(vae, latents, tile_size=6)
        in_ram = decode_latents(vae, latents, tile_size=6, budget=MemoryBudget(places=("host",)))
        in_files = decode_latents(vae, latents, tile_size=6, budget=MemoryBudget(places=("file",)))
        small_tiles = decode_latents(vae, latents, tile_size=6, budget=MemoryBudget(tile_bytes=32 << 10))
        store = MapStore(MemoryBudget(), latents.device, torch.channels_last)
        run_program(decoder_program(vae), latents, 6, None, None, store)
    assert store.peak["device"] > 0 and store.peak["host"] == store.peak["file"] == 0  # free VRAM: maps stay there
    assert in_files.device.type == "cuda" and torch.equal(in_files, on_gpu) and torch.equal(in_ram, on_gpu)
    assert (small_tiles.float() - on_gpu.float()).abs().max() < 0.05 * on_gpu.float().abs().max()


def test_tiled_vae_gpu_memory_is_bounded_by_the_tile() -> None:
    # The same decode at twice the side: peak GPU memory grows by about the output, not by the maps.
    vae = tiny_base_model(seed=15).vae.cuda()
    budget = MemoryBudget(tile_bytes=1 << 20, device_map_bytes=1 << 20, map_bytes=1 << 20)
    peaks = []
    with torch.no_grad():
        for side in (32, 64):
            latents = torch.randn(1, 4, side, side, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            decoded = decode_latents(vae, latents, tile_size=8, budget=budget)
            peaks.append(torch.cuda.max_memory_allocated() - before - decoded.numel() * decoded.element_size())
            del decoded
    assert peaks[1] < 1.5 * peaks[0] + (4 << 20), peaks
