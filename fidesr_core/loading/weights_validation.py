"""Checking that FiDeSR weights are consistent before they are used or written (docs/algorithm.md §3, §6).

``validate_fidesr_weights`` names the first problem it finds: adapters, module lists, LoRA
key names and shapes against the rank, LRRB names and shapes against ``LRRB()``, and
finite values everywhere.  ``lora_set_problem`` and ``tensor_problem`` check the parts every
family shares (``loading.family_weights`` uses them for PiSA-SR and OSEDiff).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import cache

import torch

from ..errors import WeightsFileError
from ..networks.lora import ADAPTER_NAMES
from ..networks.lrrb import LRRB
from ..networks.model import FiDeSRWeights

__all__ = ["tensor_problem", "lora_set_problem", "validate_fidesr_weights"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")


@cache
def _lrrb_shapes() -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in LRRB().state_dict().items()}


def tensor_problem(name: str, tensor: object) -> str | None:
    if not isinstance(tensor, torch.Tensor):
        return f"{name} is a {type(tensor).__name__}, expected a tensor"
    if not tensor.is_floating_point():
        return f"{name} has dtype {tensor.dtype}, expected a floating-point tensor"
    # A float64 sum of fp32/fp16/bf16 values cannot overflow, so it is finite exactly when every element is
    # (and it allocates nothing the size of the tensor, unlike isfinite()).
    wide = tensor.dtype == torch.float64
    if not (bool(torch.isfinite(tensor).all()) if wide else math.isfinite(tensor.sum(dtype=torch.float64).item())):
        return f"{name} holds NaN or infinite values (damaged or diverged weights)"
    return None


def lora_set_problem(
    rank: object,
    alpha: object,
    targets: object,
    state: object,
    adapters: Sequence[str],
    *,
    network: str = "U-Net",
) -> str | None:
    """The first problem of one LoRA set (rank, alpha, module list per adapter, peft-named tensors); None if sound.

    The adapters are exactly ``adapters``; every tensor belongs to a listed module of its adapter;
    every listed module has ``lora_A`` and ``lora_B``; shapes agree with the rank; values are finite.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return f"LoRA rank is {rank!r}, expected a positive integer"
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        return f"LoRA alpha is {alpha!r}, expected a positive number"
    if not isinstance(targets, dict) or set(targets) != set(adapters):
        names = sorted(targets) if isinstance(targets, dict) else type(targets).__name__
        return f"LoRA adapters are {names}, expected exactly {list(adapters)}"
    for adapter, modules in targets.items():
        if not isinstance(modules, list) or not all(isinstance(module, str) for module in modules):
            return f"the module list of {adapter} is not a list of module names"
    if not any(targets.values()):
        lists = "all three module lists are" if len(adapters) == 3 else "its module list is"
        return f"no {network} module carries a LoRA ({lists} empty)"
    if not isinstance(state, dict):
        return f"the LoRA state is a {type(state).__name__}, expected a dict of tensors"
    listed = {adapter: set(modules) for adapter, modules in targets.items()}
    found: dict[tuple[str, str], set[str]] = {}  # (adapter, module) -> {"A", "B"}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            return f"LoRA tensor {key!r} is not named <module>.lora_A|lora_B.<adapter>.weight"
        module, part, adapter = match["module"], match["part"], match["adapter"]
        if adapter not in targets:
            return f"LoRA tensor {key} belongs to adapter {adapter!r}, expected one of {list(adapters)}"
        if module not in listed[adapter]:
            return f"LoRA tensor {key} is for module {module}, which is not in the {adapter} module list"
        if problem := tensor_problem(f"LoRA tensor {key}", tensor):
            return problem
        shape = tuple(tensor.shape)  # A: [r, in] or [r, in, kh, kw]; B: [out, r] or [out, r, 1, 1]
        rank_axis = 0 if part == "A" else 1
        if len(shape) not in (2, 4) or shape[rank_axis] != rank:
            return f"LoRA tensor {key} has shape {shape}, expected rank {rank} on axis {rank_axis} (2-D or 4-D)"
        found.setdefault((adapter, module), set()).add(part)
    for adapter, modules in targets.items():
        for module in modules:
            absent = [
                f"{module}.lora_{part}.{adapter}.weight"
                for part in "AB"
                if part not in found.get((adapter, module), ())
            ]
            if absent:
                return f"module {module} is in the {adapter} module list but has no tensor {' or '.join(absent)}"
    return None


def _lora_problem(weights: FiDeSRWeights) -> str | None:
    return lora_set_problem(
        weights.lora_rank, weights.lora_alpha, weights.target_modules, weights.unet_lora_state, ADAPTER_NAMES
    )


def _lrrb_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return f"the LRRB state is a {type(state).__name__}, expected a dict of tensors"
    if not state:
        return "there is no LRRB (no LRRB tensors); FiDeSR weights hold the LoRA and the LRRB"
    expected = _lrrb_shapes()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        return (
            f"the LRRB tensors do not match the LRRB architecture (docs/algorithm.md §3): {len(missing)} missing"
            f"{f' (first: {missing[0]})' if missing else ''}, {len(unexpected)} unexpected"
            f"{f' (first: {unexpected[0]!r})' if unexpected else ''}"
        )
    for key, tensor in state.items():
        if problem := tensor_problem(f"LRRB tensor {key}", tensor):
            return problem
        if tuple(tensor.shape) != expected[key]:
            return f"LRRB tensor {key} has shape {tuple(tensor.shape)}, expected {expected[key]}"
    return None


def validate_fidesr_weights(weights: FiDeSRWeights, *, source: str = "") -> None:
    """Check that ``weights`` are consistent FiDeSR weights; raise ``WeightsFileError`` naming the first problem.

    Adapters are the three known ones; every LoRA key belongs to a listed module of its
    adapter; every listed module has ``lora_A`` and ``lora_B``; shapes agree with the rank;
    LRRB names and shapes equal ``LRRB().state_dict()``'s; every tensor is finite.
    """
    problem = _lora_problem(weights) or _lrrb_problem(weights.lrrb_state)
    if problem:
        raise WeightsFileError(f"{source or 'FiDeSR weights'}: {problem}")
