"""``python -m fidesr_core``."""

import sys

from .app.cli import main

sys.exit(main(prog="python -m fidesr_core"))
