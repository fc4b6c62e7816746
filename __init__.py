"""ComfyUI-FiDeSR: ComfyUI loads this file as the custom-node pack.

ComfyUI imports the pack by file path under a name made from that path, so
everything inside the pack is imported relatively.

ComfyUI has always imported ``folder_paths`` before it loads custom nodes.
Outside ComfyUI this file is still imported by tools that treat the
repository as a package (pytest does while collecting ``tests/``); there the
nodes cannot load, so the mappings are empty.
"""

import sys

if "folder_paths" in sys.modules:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
