"""ComfyUI nodes of FiDeSR (V3 node API, ``comfy_api.v0_0_2``): thin adapters over ``fidesr_core``.

Node ids and input names are user-facing API (saved workflows store them):
never rename or reorder them; new inputs may only be appended
(``tests/node_interface.json`` pins them).

``comfy_api.v0_0_2`` is not frozen.  In the ComfyUI releases tested
(0.3.64, 0.8.0 and 0.33.0) ``comfy_api/v0_0_2/__init__.py`` re-exports
``comfy_api.latest`` (``comfy_api.v0_0_2.io is comfy_api.latest.io``) and says
``STABLE = False``; ComfyUI's V3 migration guide calls v0_0_2 the current
version, still changed without warning (0.33.0 added six fields to every node's
``/object_info`` entry, for one).  Today both names give the same classes.
Naming the version is still the better choice: by the same guide, once v0_0_2
is considered stable ``latest`` moves on to a new v0_0_3 and v0_0_2 is the
version that stays, so the pack keeps the API it was written for instead of
following v0_0_3's changes.  Until then v0_0_2's changes reach the pack as
``latest``'s do; the tests against real ComfyUI releases
(``tests/test_nodes_real_comfyui.py``) are what notice them.
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
