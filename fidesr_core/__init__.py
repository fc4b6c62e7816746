"""FiDeSR engine: one-step diffusion super-resolution on Stable Diffusion 2.1-base (FiDeSR, PiSA-SR, OSEDiff).

Plain torch + diffusers + peft; no ComfyUI.  Names are imported lazily so that
``python -m fidesr_core --help`` and the ComfyUI pack start quickly.

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
    # errors
    "FiDeSRError": "errors",
    "ModelFileError": "errors",
    "BaseModelError": "errors",
    "WeightsFileError": "errors",
    "ImageInputError": "errors",
    "SettingsError": "errors",
    "OutOfMemory": "errors",
    "Cancelled": "errors",
    # models and files
    "SCALING_FACTOR": "networks.model",
    "BaseModel": "networks.model",
    "FiDeSRModel": "networks.model",
    "OneStepRestorer": "networks.model",
    "FAMILIES": "networks.families",
    "FamilyRecipe": "networks.families",
    "recipe_for": "networks.families",
    "LoraSet": "networks.families",
    "RestorerWeights": "networks.families",
    "LRRB": "networks.lrrb",
    "load_base_model": "loading.base_model",
    "identify_model_file": "loading.identify",
    "load_restorer_weights": "loading.weights",
    "save_restorer_weights": "loading.weights",
    "convert_restorer_weights": "loading.weights",
    "describe_restorer_weights": "loading.weights",
    "assemble_restorer": "loading.restorer",
    "load_restorer": "loading.restorer",
    "prompt_embedding_for": "loading.restorer",
    "resolve_device": "precision",
    "resolve_dtype": "precision",
    # the numerical operations
    "prepare_lq": "ops.preprocess",
    "encode_image": "ops.vae_codec",
    "decode_latent": "ops.vae_codec",
    "predict_residual": "ops.restoration",
    "refine_residual": "ops.restoration",
    "spatial_gate": "ops.injection",
    "low_frequency_delta": "ops.injection",
    "high_frequency_delta": "ops.injection",
    "apply_color_fix": "ops.color_fix",
    # settings, the flow and how it runs
    "UpscaleSettings": "settings",
    "LowFrequencySettings": "settings",
    "HighFrequencySettings": "settings",
    "upscale": "pipeline",
    "Latents": "pipeline",
    "encode_stage": "pipeline",
    "residual_stage": "pipeline",
    "refine_stage": "pipeline",
    "injection_stage": "pipeline",
    "decode_stage": "pipeline",
    "Runtime": "runtime",
    "STAGES": "runtime",
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
