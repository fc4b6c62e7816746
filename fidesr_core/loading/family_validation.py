"""Checking PiSA-SR and OSEDiff weights before they are used or written (docs/algorithm.md §6, §9).

Each check names the first problem it finds, prefixed with the part it is in ("the semantic
LoRA set: ..."), so a file with a set missing, ranks that disagree with the tensors or a
damaged tensor is refused with a sentence that says what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import WeightsFileError
from ..networks.families import (
    OSEDIFF_UNET_ADAPTERS,
    OSEDIFF_VAE_ADAPTER,
    PISA_SR_PIXEL_ADAPTERS,
    PISA_SR_SEMANTIC_ADAPTERS,
    LoraSet,
    OSEDiffWeights,
    PiSASRWeights,
)
from .weights_validation import lora_set_problem, tensor_problem

__all__ = ["lora_set_part_problem", "validate_pisa_sr_weights", "validate_osediff_weights"]


def lora_set_part_problem(lora_set: object, label: str, adapters: Sequence[str], network: str) -> str | None:
    """``"<label>: <problem>"`` for the first problem of ``lora_set``; None when it is sound."""
    if not isinstance(lora_set, LoraSet):
        return f"{label}: is a {type(lora_set).__name__}, expected a LoraSet"
    if isinstance(lora_set.state, dict) and not lora_set.state:
        return f"{label} is missing: there are no tensors of its adapters {', '.join(adapters)}"
    problem = lora_set_problem(
        lora_set.rank, lora_set.alpha, lora_set.target_modules, lora_set.state, adapters, network=network
    )
    return f"{label}: {problem}" if problem else None


def validate_pisa_sr_weights(weights: PiSASRWeights, *, source: str = "") -> None:
    """Both LoRA sets present and consistent; ``WeightsFileError`` naming ``source`` and the first problem."""
    problem = lora_set_part_problem(
        weights.pixel, "the pixel LoRA set", PISA_SR_PIXEL_ADAPTERS, "U-Net"
    ) or lora_set_part_problem(weights.semantic, "the semantic LoRA set", PISA_SR_SEMANTIC_ADAPTERS, "U-Net")
    if problem:
        raise WeightsFileError(f"{source or 'PiSA-SR weights'}: {problem}")


def _conv_in_problem(state: object) -> str | None:
    if not isinstance(state, dict) or not state:
        return "the trained U-Net conv_in is missing (OSEDiff trains it fully; expected conv_in weight and bias)"
    if set(state) != {"weight", "bias"}:
        return f"the trained U-Net conv_in has tensors {sorted(state)}, expected exactly ['bias', 'weight']"
    for name, tensor in state.items():
        if problem := tensor_problem(f"conv_in {name}", tensor):
            return problem
    weight, bias = state["weight"], state["bias"]
    if weight.ndim != 4 or bias.ndim != 1 or bias.shape[0] != weight.shape[0]:
        return f"conv_in weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not form a 2-D convolution"
    return None


def validate_osediff_weights(weights: OSEDiffWeights, *, source: str = "") -> None:
    """U-Net LoRA, trained conv_in and VAE encoder LoRA present and consistent; ``WeightsFileError`` otherwise."""
    problem = (
        lora_set_part_problem(weights.unet_lora, "the U-Net LoRA", OSEDIFF_UNET_ADAPTERS, "U-Net")
        or _conv_in_problem(weights.conv_in_state)
        or lora_set_part_problem(weights.vae_lora, "the VAE encoder LoRA", (OSEDIFF_VAE_ADAPTER,), "VAE encoder")
    )
    if problem:
        raise WeightsFileError(f"{source or 'OSEDiff weights'}: {problem}")
