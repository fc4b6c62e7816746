"""A summary of weights of any family, for ``fidesr info`` and ``doctor``."""

from __future__ import annotations

from ..networks.families import FAMILY_NAMES, LoraSet, PiSASRWeights
from ..networks.model import FiDeSRWeights
from .family_weights import OSEDIFF_FORMAT_MARKER, PISA_SR_FORMAT_MARKER, RestorerWeights
from .weights import describe_fidesr_weights

__all__ = ["describe_restorer_weights"]


def _set_summary(lora_set: LoraSet) -> dict[str, object]:
    return {
        "rank": lora_set.rank,
        "alpha": lora_set.alpha,
        "modules": {adapter: len(set(modules)) for adapter, modules in lora_set.target_modules.items()},
        "parameters": sum(tensor.numel() for tensor in lora_set.state.values()),
    }


def describe_restorer_weights(weights: RestorerWeights) -> dict[str, object]:
    """A summary for ``fidesr info``: family, format, each LoRA set's rank and size, dtypes, metadata."""
    if isinstance(weights, FiDeSRWeights):
        return {"family": "FiDeSR", **describe_fidesr_weights(weights)}
    pisa = isinstance(weights, PiSASRWeights)
    marker = PISA_SR_FORMAT_MARKER if pisa else OSEDIFF_FORMAT_MARKER
    formats = {"pkl": "pkl (the authors' torch.save layout)", "safetensors": f"safetensors ({marker} v1)"}
    summary: dict[str, object] = {
        "family": FAMILY_NAMES[weights.family],
        "format": formats.get(weights.file_format, "in memory"),
    }
    if pisa:
        summary |= {"pixel_lora": _set_summary(weights.pixel), "semantic_lora": _set_summary(weights.semantic)}
        tensors = [*weights.pixel.tensors(), *weights.semantic.tensors()]
    else:
        conv_in = weights.conv_in_state.get("weight")
        summary |= {
            "unet_lora": _set_summary(weights.unet_lora),
            "conv_in": tuple(conv_in.shape) if conv_in is not None else None,
            "vae_encoder_lora": _set_summary(weights.vae_lora),
        }
        tensors = [*weights.unet_lora.tensors(), *weights.conv_in_state.values(), *weights.vae_lora.tensors()]
    summary["dtypes"] = ", ".join(sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors}))
    summary["metadata"] = dict(weights.metadata)
    return summary
