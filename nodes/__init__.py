"""ComfyUI nodes of FiDeSR (V1 node API): thin adapters over ``fidesr_core``.

Node ids and input names are user-facing API (saved workflows store them):
never rename or reorder them; new inputs may only be appended.
"""

from __future__ import annotations

from .codec_nodes import FiDeSRDecode, FiDeSREncode
from .color_fix_node import FiDeSRColorFix
from .frequency_nodes import FiDeSRHighFrequencyInject, FiDeSRLowFrequencyInject
from .loader import FiDeSRModelLoader
from .model_folders import register_fidesr_folder
from .restoration_nodes import FiDeSRRefine, FiDeSRResidual
from .upscale_node import FiDeSRUpscale

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

register_fidesr_folder()

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "FiDeSRModelLoader": FiDeSRModelLoader,
    "FiDeSREncode": FiDeSREncode,
    "FiDeSRResidual": FiDeSRResidual,
    "FiDeSRRefine": FiDeSRRefine,
    "FiDeSRLowFrequencyInject": FiDeSRLowFrequencyInject,
    "FiDeSRHighFrequencyInject": FiDeSRHighFrequencyInject,
    "FiDeSRDecode": FiDeSRDecode,
    "FiDeSRUpscale": FiDeSRUpscale,
    "FiDeSRColorFix": FiDeSRColorFix,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    node_id: node_class.DISPLAY_NAME for node_id, node_class in NODE_CLASS_MAPPINGS.items()
}
