"""The released trainer's LoRA layout on the SD 2.1 U-Net, applied with peft (imported where used): three adapters,
targets by the released rule, scale ``alpha / rank`` with peft's default alpha 8 (docs/algorithm.md §5).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

ADAPTER_NAMES: tuple[str, str, str] = ("default_encoder", "default_decoder", "default_others")
PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")
RELEASED_LORA_ALPHA = 8  # peft's LoraConfig default, which the released trainer and test script rely on
LORA_TARGET_PATTERNS: tuple[str, ...] = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
    "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip


def lora_target_modules(unet: nn.Module) -> dict[str, list[str]]:
    """Module names per adapter, by the released trainer's rule on parameter names."""
    groups: dict[str, list[str]] = {name: [] for name in ADAPTER_NAMES}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in LORA_TARGET_PATTERNS):
            continue
        module = name.removesuffix(".weight")
        if "down_blocks" in name or "conv_in" in name:
            groups["default_encoder"].append(module)
        elif "up_blocks" in name or "conv_out" in name:
            groups["default_decoder"].append(module)
        else:
            groups["default_others"].append(module)
    return groups


def add_lora_adapters(
    unet: nn.Module,
    target_modules: Mapping[str, Sequence[str]],
    *,
    rank: int,
    alpha: float = RELEASED_LORA_ALPHA,
    init_lora_weights: bool | str = "gaussian",
) -> None:
    """Inject one peft LoRA adapter per group (scale ``alpha / rank``) and activate all."""
    from peft import LoraConfig

    for adapter, modules in target_modules.items():
        if not modules:
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init_lora_weights, target_modules=list(modules))
        with warnings.catch_warnings():
            # peft warns when a second adapter joins the first: three is the design.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            unet.add_adapter(config, adapter_name=adapter)
    unet.set_adapter([adapter for adapter, modules in target_modules.items() if modules])


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Every U-Net state entry whose name contains ``lora`` (the authors' ``state_dict_unet``)."""
    return {key: value for key, value in unet.state_dict().items() if "lora" in key}


def load_lora_state(unet: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load LoRA tensors into injected adapters: ``KeyError`` naming missing or unexpected keys, ``ValueError`` on
    a shape mismatch."""
    expected = lora_state_dict(unet)
    problems = {"missing": sorted(set(expected) - set(state)), "unexpected": sorted(set(state) - set(expected))}
    if any(problems.values()):
        found = ", ".join(f"{len(keys)} {what} (first: {keys[0]})" for what, keys in problems.items() if keys)
        raise KeyError(f"LoRA tensors do not match the adapters: {found}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"LoRA tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    unet.load_state_dict(dict(state), strict=False)


def merge_lora(unet: nn.Module) -> None:
    """Fold every active LoRA adapter into its base weight and remove the peft wrappers (in place, diffusers'
    ``fuse_lora`` with ``safe_fusing`` and ``unload_lora``); ``ValueError`` if a merged weight is not finite."""
    unet.fuse_lora(lora_scale=1.0, safe_fusing=True)
    unet.unload_lora()


def negated_lora_state(state: Mapping[str, torch.Tensor], renamed: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The same LoRA with ``lora_B`` negated (exact) and adapters renamed (old -> new in ``renamed``): added next
    to a merged copy of the original, it takes that LoRA back out without unmerging."""
    negated = {}
    for key, tensor in state.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise KeyError(f"LoRA tensor {key!r} is not named <module>.lora_A|lora_B.<adapter>.weight")
        new_key = f"{match['module']}.lora_{match['part']}.{renamed[match['adapter']]}.weight"
        negated[new_key] = -tensor if match["part"] == "B" else tensor.clone()
    return negated


@contextmanager
def adapters_switched_on(module: nn.Module) -> Iterator[None]:
    """Run with the module's (normally switched off) peft adapters on; off again afterwards, also on errors."""
    module.enable_adapters()
    try:
        yield
    finally:
        module.disable_adapters()
