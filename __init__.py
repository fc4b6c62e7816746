"""ComfyUI-FiDeSR: ComfyUI loads this file as the custom-node pack.

ComfyUI imports the pack by file path under a name made from that path, so
everything inside the pack is imported relatively.  The nodes use ComfyUI's
V3 API: ComfyUI calls ``comfy_entrypoint`` (and would ignore it if this module
exported ``NODE_CLASS_MAPPINGS``).

ComfyUI has always imported ``folder_paths`` before it loads custom nodes.
Outside ComfyUI this file is still imported by tools that treat the
repository as a package (pytest does while collecting ``tests/``); there the
nodes cannot load, so it defines no entry point.
"""

import sys

if "folder_paths" in sys.modules:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []
