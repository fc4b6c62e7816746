"""FiDeSR engine: one-step diffusion super-resolution on Stable Diffusion 2.1-base.

Plain torch + diffusers + peft; no ComfyUI.  Names are imported lazily so that
``python -m fidesr_core --help`` and the ComfyUI pack start quickly.

Typical use::

    from fidesr_core import load_fidesr_model, upscale, UpscaleSettings
    model = load_fidesr_model("v2-1_512-ema-pruned.safetensors", "fidesr.pkl")
    image = upscale(model, lq, UpscaleSettings(latent_mode="mode"))  # [B, 3, 4H, 4W] in [0, 1]
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "FiDeSRError": "errors",
    "ModelFileError": "errors",
    "BaseModelError": "errors",
    "WeightsFileError": "errors",
    "ImageInputError": "errors",
    "SettingsError": "errors",
    "Cancelled": "errors",
    # models and files
    "SCALING_FACTOR": "model",
    "BaseModel": "model",
    "FiDeSRModel": "model",
    "LRRB": "lrrb",
    "FiDeSRWeights": "weights",
    "load_fidesr_weights": "weights",
    "save_fidesr_weights": "weights",
    "convert_fidesr_weights": "weights",
    "describe_fidesr_weights": "weights",
    "load_base_model": "base_model",
    "identify_model_file": "checkpoint_inspect",
    "assemble_fidesr_model": "loading",
    "load_fidesr_model": "loading",
    "resolve_device": "precision",
    "resolve_dtype": "precision",
    # the steps
    "PreparedImage": "preprocess",
    "prepare_lq": "preprocess",
    "resize_to_output": "preprocess",
    "encode_image": "vae_codec",
    "decode_latent": "vae_codec",
    "predict_residual": "restoration",
    "refine_residual": "restoration",
    "restored_latent": "restoration",
    "LowFrequencySettings": "injection",
    "HighFrequencySettings": "injection",
    "spatial_gate": "injection",
    "channel_gate": "injection",
    "low_frequency_delta": "injection",
    "high_frequency_delta": "injection",
    "inject_frequencies": "injection",
    "detail_map": "detail_map",
    "butterworth_lowpass": "frequency",
    "butterworth_highpass": "frequency",
    "apply_color_fix": "color_fix",
    "run_tiled": "latent_tiling",
    # the whole pipeline
    "UpscaleSettings": "pipeline",
    "upscale": "pipeline",
    "finish_image": "pipeline",
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
