"""Where each part of a family's weights lives in the authors' ``.pkl`` and our ``.safetensors`` (docs/algorithm.md
§6); ``family_of`` tells a file's family from its keys alone, so identification and the reader name a file alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..networks.families import Family
from ..networks.lora import ADAPTER_NAMES, PEFT_KEY
from .files import Header

META = "fidesr."  # reserved metadata prefix of our .safetensors
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SetLayout:
    """One LoRA set: its part name in ``RestorerWeights.lora`` and where its pieces are in both formats."""

    part: str
    label: str  # for messages: "pixel LoRA set"
    lists: dict[str, str]  # adapter -> pkl key (and metadata name) of its module list
    rank_key: str  # pkl key of the rank
    meta_rank: str  # metadata name of the rank
    meta_alpha: str  # metadata name of the alpha (the .pkl has none: peft's default 8)
    state_key: str  # pkl key of the dict that holds its tensors
    prefix: str  # tensor-name prefix in our .safetensors
    network: str  # "U-Net" or "VAE encoder"


@dataclass(frozen=True)
class Layout:
    """A family's files; ``extras``: RestorerWeights attribute -> (label, pkl key, safetensors prefix)."""

    family: Family
    marker: str
    sets: tuple[SetLayout, ...]
    extras: dict[str, tuple[str, str, str]]

    @property
    def pkl_keys(self) -> tuple[str, ...]:
        """The authors' dict keys, in the order their trainers write them."""
        keys = [key for s in self.sets for key in (*s.lists.values(), s.rank_key)]
        keys += [s.state_key for s in self.sets] + [pkl_key for _, pkl_key, _ in self.extras.values()]
        return tuple(dict.fromkeys(keys))

    def part_keys(self) -> dict[str, set[str]]:
        """label -> the pkl keys only that part uses (all absent: the part is missing)."""
        own = {s.label: {*s.lists.values(), s.rank_key, s.state_key} for s in self.sets}
        own |= {label: {pkl_key} for label, pkl_key, _ in self.extras.values()}
        return {label: keys - set().union(*(v for k, v in own.items() if k != label)) for label, keys in own.items()}


def _unet_set(part: str, label: str, suffix: str, rank_key: str, meta_rank: str, meta_alpha: str) -> SetLayout:
    lists = {f"{a}{suffix}": f"unet_lora_{a.removeprefix('default_')}_modules{suffix}" for a in ADAPTER_NAMES}
    return SetLayout(part, label, lists, rank_key, meta_rank, meta_alpha, "state_dict_unet", "unet_lora.", "U-Net")


_VAE_LISTS = {"default_encoder": "vae_lora_encoder_modules"}
LAYOUTS: dict[str, Layout] = {
    "fidesr": Layout("fidesr", "fidesr-weights", (
        _unet_set("unet", "U-Net LoRA", "", "lora_rank_unet", "lora_rank", "lora_alpha"),
    ), {"lrrb_state": ("LRRB", "lrrb_state_dict", "lrrb.")}),
    "pisa-sr": Layout("pisa-sr", "pisa-sr-weights", (
        _unet_set("pixel", "pixel LoRA set", "_pix", "lora_rank_unet_pix", "lora_rank_unet_pix", "lora_alpha_pix"),
        _unet_set("semantic", "semantic LoRA set", "_sem", "lora_rank_unet_sem", "lora_rank_unet_sem", "lora_alpha_sem"),
    ), {}),
    "osediff": Layout("osediff", "osediff-weights", (
        _unet_set("unet", "U-Net LoRA", "", "rank_unet", "rank_unet", "lora_alpha_unet"),
        SetLayout("vae_encoder", "VAE encoder LoRA", _VAE_LISTS, "rank_vae", "rank_vae", "lora_alpha_vae",
                  "state_dict_vae", "vae_lora.", "VAE encoder"),
    # conv_in sits inside state_dict_unet, as conv_in.base_layer.* (peft's name when it carries a LoRA) or conv_in.*
    ), {"conv_in_state": ("trained U-Net conv_in", "state_dict_unet", "unet_conv_in.")}),
}  # fmt: skip


def adapter_of(key: object) -> str | None:
    """The adapter of a peft LoRA tensor name (``<module>.lora_A.<adapter>.weight``), else None."""
    match = PEFT_KEY.match(key) if isinstance(key, str) else None
    return match["adapter"] if match else None


def family_of(header: Header) -> Family | None:
    """The family whose weights ``header`` describes, from our marker, the authors' dict keys or, in
    someone else's file, peft adapter names; None when it is none of them."""
    marker = header.metadata.get(META + "format")
    for layout in LAYOUTS.values():
        if marker == layout.marker:
            return layout.family
    if header.top_keys:  # the authors' .pkl: the family whose keys it shares most (FiDeSR on a tie)
        best = max(LAYOUTS.values(), key=lambda layout: len(header.top_keys & set(layout.pkl_keys)))
        if header.top_keys & set(best.pkl_keys):
            return best.family
    adapters = {adapter_of(key) for key in header.shapes}
    if any(adapter and adapter.endswith(("_pix", "_sem")) for adapter in adapters):
        return "pisa-sr"
    if adapters & set(ADAPTER_NAMES) or any("lrrb" in key for key in header.shapes):
        return "fidesr"
    return None
