"""FiDeSR engine: one-step diffusion super-resolution on Stable Diffusion 2.1-base (FiDeSR, PiSA-SR, OSEDiff).

Plain torch + diffusers + peft; no ComfyUI.  Names are imported lazily, so the CLI and the pack start quickly.

Typical use::

    from fidesr_core import load_restorer, upscale, UpscaleSettings
    model = load_restorer("v2-1_512-ema-pruned.safetensors", "pisa_sr.pkl")  # or fidesr.pkl, osediff.pkl
    image = upscale(model, lq, UpscaleSettings(latent_mode="mode"))  # [B, 3, 4H, 4W] in [0, 1]
    model.family  # "fidesr", "pisa-sr" or "osediff"
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load_restorer": "loading.restorer",
    "load_restorer_weights": "loading.weights",
    "OneStepRestorer": "networks.model",
    "UpscaleSettings": "settings",
    "LowFrequencySettings": "settings",
    "HighFrequencySettings": "settings",
    "upscale": "pipeline",
    "Runtime": "runtime",
    "FiDeSRError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fidesr_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
