"""The nodes as ComfyUI citizens: progress, interrupts, out-of-memory retry, device moves, import without ComfyUI.

Fixtures in ``conftest.py``; ``comfy_stub`` records what the nodes ask ComfyUI for.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from comfy_stub import InterruptProcessingException
from node_helpers import PACK_ROOT, run_node


def test_progress_per_tile_and_memory_requests(comfy, handle, default_chain) -> None:
    stub = comfy.stub
    run_node(comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=48, tile_overlap=16)
    # A 64 x 64 latent in 48-px tiles with stride 32: 2 rows x 2 columns.
    assert stub.progress == [(done, 4) for done in range(1, 5)]
    assert stub.progress_bars == 1
    assert stub.free_memory_calls and all(device == torch.device("cpu") for _, device in stub.free_memory_calls)
    assert stub.free_memory_calls[0][0] > 0
    assert stub.interrupt_checks >= 4  # checked before every tile


def test_interrupt_between_tiles_raises_comfyuis_exception(comfy, handle, default_chain) -> None:
    stub = comfy.stub
    stub.interrupt_after_checks = 3
    with pytest.raises(InterruptProcessingException):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=48, tile_overlap=16)
    assert len(stub.progress) == 2  # two tiles finished, then the interrupt
    assert handle.active_users == 0


def test_out_of_memory_retries_once_with_half_the_tile(comfy, handle, default_chain, monkeypatch, caplog) -> None:
    restoration_nodes = comfy.module("nodes.restoration_nodes")
    encoded = default_chain["encoded"]
    residual = torch.full_like(encoded["samples"], 0.5)
    tiles: list[tuple[int, int]] = []

    def predict_running_out_once(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append((kwargs["tile_size"], kwargs["tile_overlap"]))
        if len(tiles) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return residual

    monkeypatch.setattr(restoration_nodes, "predict_residual", predict_running_out_once)
    with caplog.at_level(logging.WARNING, logger="FiDeSR"):
        (latent,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=64, tile_overlap=16)
    assert tiles == [(64, 16), (32, 8)]
    assert "FiDeSR One-Step U-Net: out of memory with tile_size 64; retrying once with tile_size 32" in caplog.text
    assert comfy.stub.soft_empty_cache_calls >= 1
    assert torch.equal(latent["fidesr"].residual, residual)  # the retry's result is used

    def always_out_of_memory(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append((kwargs["tile_size"], kwargs["tile_overlap"]))
        raise torch.OutOfMemoryError("CUDA out of memory")

    tiles.clear()
    monkeypatch.setattr(restoration_nodes, "predict_residual", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=0, tile_overlap=0)
    assert tiles == [(0, 0), (32, 0)]  # 0 = untiled; the retry halves the latent's 64-px side

    def other_error(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append((kwargs["tile_size"], kwargs["tile_overlap"]))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    tiles.clear()
    monkeypatch.setattr(restoration_nodes, "predict_residual", other_error)
    with pytest.raises(RuntimeError, match="mat1"):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=32, tile_overlap=8)
    assert tiles == [(32, 8)]  # no retry for errors other than out-of-memory


def test_model_moves_to_the_torch_device_only_while_running(comfy, handle, lq_image, monkeypatch) -> None:
    moves: list[str] = []
    fake_offload = torch.device("cpu", 1)  # a distinct device object; the recorder does not really move
    monkeypatch.setattr(handle, "offload_device", fake_offload)
    monkeypatch.setattr(handle.model, "to", lambda device: moves.append(str(device)) or handle.model)
    run_node(comfy, "FiDeSREncode", model=handle, image=lq_image, latent_mode="mode")
    assert moves == ["cpu", "cpu:1"]
    moves.clear()
    run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image, lf_strength=0.0, hf_strength=0.0, tile_size=0)
    assert moves == ["cpu", "cpu:1"]  # one round trip for the whole one-node run
    assert handle.active_users == 0


def test_outside_comfyui_the_pack_exports_no_nodes(monkeypatch) -> None:
    # pytest (and other tools) import the repository's __init__.py as a package without ComfyUI.
    import importlib.util
    import sys

    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    spec = importlib.util.spec_from_file_location("fidesr_pack_without_comfyui", PACK_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}
