"""Helpers for the node tests (``test_nodes*.py``): call a node as ComfyUI does, run the whole chain, catch errors.

The fixtures they take (``comfy``, ``handle``, images) are in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

__all__ = ["PACK_ROOT", "chain", "error_of", "loader_lists", "run_node"]

PACK_ROOT = Path(__file__).resolve().parents[1]


def run_node(comfy, node_id: str, **inputs: Any) -> tuple:
    """Call a node as ComfyUI's executor calls a V3 node, under inference mode.

    With the stand-ins: its ``execute`` classmethod; in a real ComfyUI (``real_comfyui_check.py``) as the
    executor does it, on a clone of the class (``PREPARE_CLASS_CLONE``, ``EXECUTE_NORMALIZED``).
    """
    node = comfy.nodes[node_id]
    with torch.inference_mode():
        if hasattr(node, "PREPARE_CLASS_CLONE"):
            return node.PREPARE_CLASS_CLONE(None).EXECUTE_NORMALIZED(**inputs).result
        return node.execute(**inputs).result


def chain(comfy, handle, image: torch.Tensor, *, injections: bool = True, **overrides: Any) -> dict[str, Any]:
    """Encode -> One-Step U-Net -> LRRB -> LF -> HF -> Decode; every intermediate output."""
    encode = {"upscale_by": 4.0, "latent_mode": "sample", "seed": 0, "tile_size": 1024} | overrides.get("encode", {})
    residual = {"tile_size": 96, "tile_overlap": 32} | overrides.get("residual", {})
    out: dict[str, Any] = {}
    (out["encoded"],) = run_node(comfy, "FiDeSREncode", model=handle, image=image, **encode)
    (out["residual"],) = run_node(comfy, "FiDeSRResidual", model=handle, latent=out["encoded"], **residual)
    (out["refined"],) = run_node(comfy, "FiDeSRRefine", model=handle, latent=out["residual"])
    latent = out["refined"]
    if injections:
        (out["lf"],) = run_node(comfy, "FiDeSRLowFrequencyInject", latent=latent, **overrides.get("lf", {}))
        (latent,) = run_node(comfy, "FiDeSRHighFrequencyInject", latent=out["lf"], **overrides.get("hf", {}))
        out["hf"] = latent
    (out["image"],) = run_node(comfy, "FiDeSRDecode", model=handle, latent=latent, color_fix="adain", tile_size=224)
    return out


def error_of(comfy, node_id: str, **inputs: Any) -> str:
    """The message of the FiDeSRNodeError that running ``node_id`` raises (the test fails when none is raised)."""
    errors = comfy.module("nodes.errors")
    with pytest.raises(errors.FiDeSRNodeError) as caught:
        run_node(comfy, node_id, **inputs)
    return str(caught.value)


def loader_lists(comfy) -> dict[str, list[str]]:
    """The choices of Load FiDeSR Model's combos, as ComfyUI's ``/object_info`` lists them now."""
    required = comfy.nodes["FiDeSRModelLoader"].GET_NODE_INFO_V1()["input"]["required"]
    return {name: spec[1]["options"] for name, spec in required.items()}
