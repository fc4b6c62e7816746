"""The nodes as ComfyUI citizens: memory manager, batches, progress, interrupts, out of memory, import without ComfyUI.

Fixtures in ``conftest.py``; ``comfy_stub`` records what the nodes ask ComfyUI for.  That the real
memory manager keeps the networks resident is checked in ``test_nodes_real_comfyui.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from comfy_stub import InterruptProcessingException
from node_helpers import PACK_ROOT, chain, error_of, run_node


def _requested(comfy, handle) -> list[tuple[str, ...]]:
    """The networks each load_models_gpu call asked for, by name."""
    names = {id(patcher): name for name, patcher in handle.patchers.items()}
    return [tuple(names[id(patcher)] for patcher in patchers) for patchers, _, _ in comfy.stub.load_requests]


def test_progress_per_tile_and_memory_requests(comfy, handle, default_chain) -> None:
    stub = comfy.stub
    run_node(comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=48, tile_overlap=16)
    # A 64 x 64 latent in 48-px tiles with stride 32: 2 rows x 2 columns.
    assert stub.progress == [(done, 4) for done in range(1, 5)]
    assert stub.progress_bars == 1
    ((patchers, memory_required, full_load),) = stub.load_requests
    assert patchers == (handle.patchers["unet"],) and memory_required > 0
    assert not full_load  # the U-Net may be loaded partly (--lowvram)
    assert stub.interrupt_checks >= 4  # checked before every tile


def test_each_node_asks_only_for_its_own_networks(comfy, handle, lq_image) -> None:
    chain(comfy, handle, lq_image)
    assert _requested(comfy, handle) == [("vae",), ("unet",), ("lrrb",), ("vae",)]  # LF and HF load nothing
    assert [full for _, _, full in comfy.stub.load_requests] == [True, False, True, True]
    comfy.stub.reset_records()
    run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image)
    assert _requested(comfy, handle) == [("vae",), ("unet",), ("lrrb",), ("vae",)]


def test_networks_stay_resident_between_runs_until_unloaded(comfy, handle, lq_image) -> None:
    stub = comfy.stub
    model_patcher = comfy.module("nodes.model_handle").comfy.model_patcher
    assert all(type(patcher) is model_patcher.ModelPatcher for patcher in handle.patchers.values())
    chain(comfy, handle, lq_image)
    run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image)
    assert len(stub.loads) <= 3  # at most once each (earlier tests of this file may have loaded them)
    stub.reset_records()
    chain(comfy, handle, lq_image)
    run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image)
    assert stub.load_requests and stub.loads == []  # asked for again, nothing had to be loaded
    assert {id(p) for p in handle.patchers.values()} <= {id(p) for p in stub.loaded}
    comfy.module("nodes.runtime").model_management.unload_all_models()  # what ComfyUI's "Unload models" does
    run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_image)
    assert sorted(_name(handle, p) for p in stub.loads) == ["lrrb", "unet", "vae"]


def _name(handle, patcher: Any) -> str:
    return next(name for name, candidate in handle.patchers.items() if candidate is patcher)


def test_unet_layers_can_be_cast_by_comfyui_for_partial_loads(comfy, handle) -> None:
    assert handle.partial_load == {"unet": True, "vae": False, "lrrb": False}
    layers = [module for module in handle.model.unet.modules() if next(module.parameters(False), None) is not None]
    assert layers and all(hasattr(module, "comfy_cast_weights") for module in layers)
    assert all(isinstance(module, torch.nn.Module) for module in layers)


def test_state_rests_on_comfyuis_intermediate_device(comfy, default_chain) -> None:
    for name in ("encoded", "residual", "refined", "lf", "hf"):
        latent = default_chain[name]
        state = latent["fidesr"]
        assert latent["samples"] is state.samples
        tensors = [state.latents.z_lq, state.latents.reference, state.latents.gate, state.samples]
        assert all(tensor.device == comfy.stub.intermediate_device for tensor in tensors)
    encoded_gate = default_chain["encoded"]["fidesr"].latents.gate
    assert encoded_gate.shape == (1, 1, 64, 64)  # computed once, by the encode stage
    assert default_chain["hf"]["fidesr"].latents.gate is encoded_gate


def test_interrupt_between_tiles_raises_comfyuis_exception(comfy, handle, default_chain) -> None:
    stub = comfy.stub
    stub.interrupt_after_checks = 4
    with pytest.raises(InterruptProcessingException):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=48, tile_overlap=16)
    assert len(stub.progress) == 2  # checked by the runner, then before each tile: two tiles ran


def test_out_of_memory_halves_the_tile_until_it_fits(comfy, handle, default_chain, monkeypatch, caplog) -> None:
    steps = comfy.module("fidesr_core.pipeline")
    encoded = default_chain["encoded"]
    residual = torch.full_like(encoded["samples"], 0.5)
    tiles: list[tuple[int, int]] = []

    def predict_running_out_twice(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append((kwargs["tile_size"], kwargs["tile_overlap"]))
        if len(tiles) <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return residual

    monkeypatch.setattr(steps, "predict_residual", predict_running_out_twice)
    with caplog.at_level(logging.WARNING):
        (latent,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=64, tile_overlap=16)
    assert tiles == [(64, 16), (32, 8), (16, 4)]  # the overlap keeps its share of the tile
    assert "the residual stage ran out of memory with tile 64 and 1 image(s) at a time; retrying" in caplog.text
    assert comfy.stub.soft_empty_cache_calls >= 2
    assert torch.equal(latent["fidesr"].latents.residual, residual)  # the retry's result is used


def test_out_of_memory_at_the_smallest_tile_names_node_tile_and_remedies(comfy, handle, default_chain, monkeypatch):
    steps = comfy.module("fidesr_core.pipeline")
    tiles: list[int] = []

    def always_out_of_memory(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append(kwargs["tile_size"])
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(steps, "predict_residual", always_out_of_memory)
    message = error_of(
        comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=0, tile_overlap=0
    )
    assert tiles == [0, 32, 16]  # 0 = untiled: the first retry halves the latent's 64-px side; 16 is the floor
    assert message.startswith(
        "FiDeSR One-Step U-Net: the residual stage ran out of memory with tiles of 16 latent pixels and one image"
    )
    assert "--lowvram" in message and "Unload Models" in message

    def other_error(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tiles.append(kwargs["tile_size"])
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    tiles.clear()
    monkeypatch.setattr(steps, "predict_residual", other_error)
    with pytest.raises(RuntimeError, match="mat1"):
        run_node(comfy, "FiDeSRResidual", model=handle, latent=default_chain["encoded"], tile_size=32, tile_overlap=8)
    assert tiles == [32]  # no retry for errors other than out-of-memory


def test_batches_run_in_chunks_that_fit_with_each_image_as_alone(comfy, handle, lq_images, monkeypatch) -> None:
    stub = comfy.stub
    one_at_a_time = torch.cat(
        [run_node(comfy, "FiDeSRUpscale", model=handle, image=image[None])[0] for image in lq_images]
    )
    steps = comfy.module("fidesr_core.pipeline")
    chunk_sizes: list[int] = []
    real_predict = steps.predict_residual

    def recording_predict(model: Any, z_lq: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        chunk_sizes.append(z_lq.shape[0])
        return real_predict(model, z_lq, **kwargs)

    monkeypatch.setattr(steps, "predict_residual", recording_predict)
    stub.reset_records()
    (together,) = run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_images)
    assert chunk_sizes == [2]  # plenty of free memory: the whole batch at once
    # Room for one image's working memory at a time: one image per chunk, progress over the batch.
    unet_bytes = stub.load_requests[1][1]
    monkeypatch.setattr(stub, "free_memory_bytes", unet_bytes + 1)
    chunk_sizes.clear()
    stub.reset_records()
    (chunked,) = run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_images, latent_mode="sample", seed=3)
    assert chunk_sizes == [1, 1]
    assert stub.progress[-1] == (2, 2)  # the decode's bar counted both images
    torch.testing.assert_close(together, one_at_a_time, atol=1e-5, rtol=0)
    (alone,) = run_node(comfy, "FiDeSRUpscale", model=handle, image=lq_images[1:], latent_mode="sample", seed=3)
    torch.testing.assert_close(chunked[1:], alone, atol=1e-5, rtol=0)  # noise per image, not per batch position


def test_out_of_memory_with_a_batch_first_takes_fewer_images(comfy, handle, lq_images, monkeypatch) -> None:
    steps = comfy.module("fidesr_core.pipeline")
    real_refine = steps.refine_residual
    batches: list[int] = []

    def refine_needing_one_at_a_time(model: Any, z_lq: torch.Tensor, residual: torch.Tensor, **kwargs: Any):
        batches.append(z_lq.shape[0])
        if z_lq.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_refine(model, z_lq, residual, **kwargs)

    (encoded,) = run_node(comfy, "FiDeSREncode", model=handle, image=lq_images, latent_mode="mode")
    (residual,) = run_node(comfy, "FiDeSRResidual", model=handle, latent=encoded, tile_size=0, tile_overlap=0)
    (expected,) = run_node(comfy, "FiDeSRRefine", model=handle, latent=residual)
    monkeypatch.setattr(steps, "refine_residual", refine_needing_one_at_a_time)
    (refined,) = run_node(comfy, "FiDeSRRefine", model=handle, latent=residual)
    assert batches == [2, 1, 1]
    torch.testing.assert_close(refined["samples"], expected["samples"], atol=1e-6, rtol=0)


def test_outside_comfyui_the_pack_exports_no_nodes(monkeypatch) -> None:
    # pytest (and other tools) import the repository's __init__.py as a package without ComfyUI.
    import importlib.util
    import sys

    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    spec = importlib.util.spec_from_file_location("fidesr_pack_without_comfyui", PACK_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "comfy_entrypoint") and not hasattr(module, "NODE_CLASS_MAPPINGS")
