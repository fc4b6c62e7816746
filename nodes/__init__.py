"""ComfyUI nodes of FiDeSR (V3 node API, ``comfy_api.v0_0_2``): thin adapters over ``fidesr_core``.

Node ids and input names are user-facing API (saved workflows store them): never rename or reorder them;
new inputs may only be appended (``tests/node_interface.json`` pins them).

``v0_0_2`` still re-exports ``comfy_api.latest`` and changes without warning (ComfyUI 0.3.64 to 0.33.0), but
once it is declared stable ``latest`` moves on to v0_0_3 and v0_0_2 stays: naming it keeps the API the pack
was written for.  ``tests/test_nodes_real_comfyui.py`` notices the changes until then.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .codec_nodes import FiDeSRDecode, FiDeSREncode
from .color_fix_node import FiDeSRColorFix
from .comfy_model import FiDeSRModelFromCheckpoint
from .frequency_nodes import FiDeSRHighFrequencyInject, FiDeSRLowFrequencyInject
from .loader import FiDeSRModelLoader
from .model_folders import register_fidesr_folder
from .restoration_nodes import FiDeSRRefine, FiDeSRResidual
from .upscale_node import FiDeSRUpscale

__all__ = ["NODES", "FiDeSRExtension", "comfy_entrypoint"]

register_fidesr_folder()

NODES: tuple[type[io.ComfyNode], ...] = (
    FiDeSRModelLoader,
    FiDeSREncode,
    FiDeSRResidual,
    FiDeSRRefine,
    FiDeSRLowFrequencyInject,
    FiDeSRHighFrequencyInject,
    FiDeSRDecode,
    FiDeSRUpscale,
    FiDeSRColorFix,
    FiDeSRModelFromCheckpoint,
)


class FiDeSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FiDeSRExtension:
    return FiDeSRExtension()
