"""Test helper: run a few lines in a fresh Python process that measures how much its peak RSS grows.

A fresh process, so that memory other tests freed (but the allocator kept) cannot hide the growth.
The lines see ``torch``, ``json``, ``vae`` (a small random SD-shaped VAE, seeded) and
``peak_growth_kib(call)``, and print one JSON object as their last line.  Linux only (it reads
``/proc/self/status``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["run_probe"]

REPO_ROOT = Path(__file__).resolve().parents[1]

_PREAMBLE = textwrap.dedent(
    """
    import ctypes, json
    import torch
    from diffusers import AutoencoderKL

    try:  # glibc: give every block over 64 KiB back to the system when freed, so RSS follows live memory
        ctypes.CDLL(None).mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (AttributeError, OSError):
        pass

    try:  # pin the pages resident now: memory pressure from other processes evicting library pages during a
        # call would otherwise lower its peak RSS below the RSS before it (seen on a loaded 24 GB machine)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mlockall(1 | 4)  # MCL_CURRENT | MCL_ONFAULT: pages of today's mappings, as they are touched
    except (AttributeError, OSError):
        pass

    def status_kib(key):
        with open("/proc/self/status") as status:
            return int(status.read().split(key + ":")[1].split()[0])

    def peak_growth_kib(call):
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status_kib("VmRSS")
        call()
        return status_kib("VmHWM") - before

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    ).eval()
    """
)


def run_probe(lines: str, *, timeout: float) -> dict[str, Any]:
    """Run ``lines`` (dedented) after the preamble in a fresh process; the JSON object it printed last."""
    script = _PREAMBLE + textwrap.dedent(lines)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])
