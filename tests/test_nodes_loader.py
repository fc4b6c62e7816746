"""The FiDeSR model loader node: listing model files, extra model paths, precision, bad files.

A tiny SD 2-shaped diffusers folder and FiDeSR weights are written into the stub's model folders;
shared fixtures in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from node_helpers import PACK_ROOT, error_of, loader_lists, run_node


def _write_diffusers_folder(base: Any, folder: Path, config_dir: Path) -> None:
    folder.mkdir(parents=True)
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text((config_dir / "model_index.json").read_text())
    (folder / "scheduler").mkdir()
    scheduler = (config_dir / "scheduler" / "scheduler_config.json").read_text()
    (folder / "scheduler" / "scheduler_config.json").write_text(scheduler)


@pytest.fixture(scope="module")
def model_files(comfy) -> SimpleNamespace:
    """A tiny SD 2-shaped diffusers folder and FiDeSR weights for it, in the stub's model folders."""
    tiny = comfy.module("fidesr_core.networks.tiny")
    base = tiny.tiny_base_model(seed=4)
    weights = tiny.tiny_fidesr_weights(base, seed=5)
    config_dir = PACK_ROOT / "fidesr_core" / "loading" / "configs" / "sd21_base"
    _write_diffusers_folder(base, comfy.models_dir / "diffusers" / "tiny-sd21", config_dir)
    (comfy.models_dir / "fidesr").mkdir(exist_ok=True)
    save_restorer_weights = comfy.module("fidesr_core.loading.weights").save_restorer_weights
    save_restorer_weights(weights, comfy.models_dir / "fidesr" / "fidesr-tiny.pkl")  # the authors' layout
    save_restorer_weights(weights, comfy.models_dir / "fidesr" / "tiny.safetensors")
    (comfy.models_dir / "fidesr" / "corrupt.pkl").write_bytes(b"\x80\x04this is not a torch file" * 10)
    (comfy.models_dir / "fidesr" / "readme.txt").write_text("not weights")
    return SimpleNamespace(base_seed=4, weights=weights)


def test_loader_lists_model_files_with_stable_prefixed_names(comfy, model_files) -> None:
    checkpoints = comfy.models_dir / "checkpoints" / "sd2"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "v2-1_512-ema-pruned.safetensors").write_bytes(b"")
    lists = loader_lists(comfy)
    assert lists["base_model"] == ["diffusers/tiny-sd21", "checkpoints/sd2/v2-1_512-ema-pruned.safetensors"]
    assert lists["fidesr_weights"] == ["corrupt.pkl", "fidesr-tiny.pkl", "tiny.safetensors"]  # no .txt


def test_loader_combos_load_with_empty_model_folders(comfy, tmp_path, monkeypatch) -> None:
    names = comfy.stub.folder_names_and_paths
    for folder in ("checkpoints", "diffusers", "fidesr"):
        monkeypatch.setitem(names, folder, ([str(tmp_path / folder)], names[folder][1]))
    lists = loader_lists(comfy)  # only the released files, as download entries (test_nodes_downloads.py)
    assert lists["base_model"] == [
        "checkpoints/v2-1_512-ema-pruned.safetensors (download from Manojb/stable-diffusion-2-1-base)"
    ]
    assert lists["fidesr_weights"] == ["fidesr.pkl (download from jmjin2/FiDeSR)"]


def test_extra_model_paths_are_kept_and_listed(comfy, model_files, tmp_path, monkeypatch) -> None:
    model_folders = comfy.module("nodes.model_folders")
    names = comfy.stub.folder_names_and_paths
    default_fidesr = str(comfy.models_dir / "fidesr")
    extra = {folder: tmp_path / folder for folder in ("fidesr", "diffusers", "checkpoints")}
    for path in extra.values():
        path.mkdir()
    # What extra_model_paths.yaml does before ComfyUI imports custom nodes: a 'fidesr' entry with no extensions.
    monkeypatch.setitem(names, "fidesr", ([str(extra["fidesr"])], set()))
    monkeypatch.setitem(names, "diffusers", (names["diffusers"][0] + [str(extra["diffusers"])], names["diffusers"][1]))
    monkeypatch.setitem(
        names, "checkpoints", (names["checkpoints"][0] + [str(extra["checkpoints"])], names["checkpoints"][1])
    )
    model_folders.register_fidesr_folder()
    paths, extensions = names["fidesr"]
    assert paths == [str(extra["fidesr"]), default_fidesr] and {".pkl", ".safetensors"} <= set(extensions)
    (extra["fidesr"] / "other.safetensors").write_bytes(b"")
    (extra["diffusers"] / "sd21" / "unet").mkdir(parents=True)
    (extra["diffusers"] / "sd21" / "model_index.json").write_text("{}")
    (extra["checkpoints"] / "extra.safetensors").write_bytes(b"")
    lists = loader_lists(comfy)
    assert "other.safetensors" in lists["fidesr_weights"] and "fidesr-tiny.pkl" in lists["fidesr_weights"]
    assert {"diffusers/sd21", "diffusers/tiny-sd21", "checkpoints/extra.safetensors"} <= set(lists["base_model"])
    assert model_folders.resolve_base_model("diffusers/sd21", "node") == str(extra["diffusers"] / "sd21")
    assert model_folders.resolve_fidesr_weights("other.safetensors", "node") == str(
        extra["fidesr"] / "other.safetensors"
    )
    model_folders.register_fidesr_folder()  # idempotent
    assert names["fidesr"][0] == [str(extra["fidesr"]), default_fidesr]


def test_loader_builds_the_model_with_comfyuis_precision(comfy, model_files) -> None:
    comfy.stub.unet_dtype = torch.bfloat16  # as ComfyUI would choose on a bf16 GPU, or with --bf16-unet
    try:
        (handle,) = run_node(
            comfy, "FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="fidesr-tiny.pkl"
        )
    finally:
        comfy.stub.unet_dtype = torch.float32
    assert handle.dtype == torch.bfloat16 and next(handle.model.unet.parameters()).dtype == torch.bfloat16
    unet = handle.patchers["unet"]
    assert unet.load_device == comfy.stub.torch_device and unet.offload_device == comfy.stub.offload_device
    (fp32,) = run_node(
        comfy,
        "FiDeSRModelLoader",
        base_model="diffusers/tiny-sd21",
        fidesr_weights="fidesr-tiny.pkl",
        precision="fp32",
    )
    assert fp32.dtype == torch.float32
    # The same networks as assembling the tiny model and weights directly.
    tiny = comfy.module("fidesr_core.networks.tiny")
    loading = comfy.module("fidesr_core.loading.restorer")
    direct = loading.assemble_restorer(
        tiny.tiny_base_model(seed=model_files.base_seed), model_files.weights, precision="fp32", device="cpu"
    )
    torch.testing.assert_close(fp32.model.prompt_embedding, direct.prompt_embedding)
    for loaded, expected in zip(fp32.model.unet.parameters(), direct.unet.parameters(), strict=True):
        torch.testing.assert_close(loaded, expected)
    for loaded, expected in zip(fp32.model.lrrb.parameters(), direct.lrrb.parameters(), strict=True):
        torch.testing.assert_close(loaded, expected)
    (from_safetensors,) = run_node(
        comfy,
        "FiDeSRModelLoader",
        base_model="diffusers/tiny-sd21",
        fidesr_weights="tiny.safetensors",
        precision="fp32",
    )
    for loaded, expected in zip(from_safetensors.model.unet.parameters(), direct.unet.parameters(), strict=True):
        torch.testing.assert_close(loaded, expected)


def test_loader_reports_bad_files_on_the_node(comfy, model_files) -> None:
    message = error_of(
        comfy, "FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="corrupt.pkl", precision="fp32"
    )
    assert message.startswith("Load FiDeSR Model:") and "corrupt.pkl" in message
    message = error_of(
        comfy, "FiDeSRModelLoader", base_model="diffusers/missing", fidesr_weights="fidesr-tiny.pkl", precision="fp32"
    )
    assert message.startswith("Load FiDeSR Model: base_model 'diffusers/missing'") and "model_index.json" in message
    message = error_of(
        comfy, "FiDeSRModelLoader", base_model="sd21.safetensors", fidesr_weights="fidesr-tiny.pkl", precision="fp32"
    )
    assert "checkpoints/<file>" in message
    message = error_of(
        comfy, "FiDeSRModelLoader", base_model="diffusers/tiny-sd21", fidesr_weights="nope.pkl", precision="fp32"
    )
    assert message.startswith("Load FiDeSR Model: fidesr_weights 'nope.pkl' is not in the fidesr model folders")


def test_loader_keeps_no_text_encoder_and_one_patcher_per_network(comfy, model_files) -> None:
    import gc

    from transformers import CLIPTextModel

    def text_encoders() -> int:
        gc.collect()
        return sum(isinstance(thing, CLIPTextModel) for thing in gc.get_objects())

    before = text_encoders()
    (handle,) = run_node(
        comfy,
        "FiDeSRModelLoader",
        base_model="diffusers/tiny-sd21",
        fidesr_weights="tiny.safetensors",
        precision="fp32",
    )
    assert text_encoders() == before  # the empty-prompt embedding was kept, the encoder let go
    assert handle.model.prompt_embedding.shape[:2] == (1, 77)
    networks = {name: patcher.model.network for name, patcher in handle.patchers.items()}
    assert networks == {"unet": handle.model.unet, "vae": handle.model.vae, "lrrb": handle.model.lrrb}
    assert set(comfy.module("nodes.loader").loader_choices()) == {"base_model", "fidesr_weights", "precision"}
