"""ComfyUI nodes of FiDeSR (V3 node API, ``comfy_api.v0_0_2``): thin adapters over ``fidesr_core``.

Node ids and input names are user-facing API (saved workflows store them):
never rename or reorder them; new inputs may only be appended.

Why ``comfy_api.v0_0_2`` and not ``comfy_api.latest``: ComfyUI's versioning
plan points ``latest`` at the API still under development and freezes the
numbered version before it once a newer one exists.  In every ComfyUI that
has the V3 API so far (0.3.64 and 0.8.0 included) ``v0_0_2`` is the newest
numbered version and re-exports ``latest`` unchanged, so today both give the
same classes; importing the number keeps the pack on the API it was written
and tested against when ``latest`` moves on.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .codec_nodes import FiDeSRDecode, FiDeSREncode
from .color_fix_node import FiDeSRColorFix
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
)


class FiDeSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FiDeSRExtension:
    return FiDeSRExtension()
