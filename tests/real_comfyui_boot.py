"""First import of the scripts that run the pack in a REAL ComfyUI (``--cpu``), ``script.py COMFYUI_DIR WORK_DIR``:
puts ComfyUI, the tests and the pack on the path and lets ComfyUI parse its (fixed) arguments."""

from __future__ import annotations

import sys
from pathlib import Path

COMFYUI_DIR, WORK_DIR = (Path(argument).resolve() for argument in sys.argv[1:3])
TESTS_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(COMFYUI_DIR), str(TESTS_DIR), str(TESTS_DIR.parent)]
sys.argv = ["main.py", "--cpu"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
