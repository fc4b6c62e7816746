"""OpenCLIP text tower (as stored in SD 2.x single files) -> transformers ``CLIPTextModel`` weights.

SD 2.x checkpoints keep the text encoder under ``cond_stage_model.model.`` in
OpenCLIP's naming: one packed ``attn.in_proj_weight`` per block (q, k and v
stacked along dim 0), ``mlp.c_fc`` / ``mlp.c_proj``, ``ln_final``.  SD 2 reads
the penultimate block's output (then ``ln_final``), so the transformers model
has one layer fewer than the file and the last resblock is simply not used.
``text_projection`` and ``logit_scale`` belong to CLIP's contrastive head and
are ignored as well.

Keys are produced without transformers' optional ``text_model.`` prefix
(transformers 4.x has it, 5.x does not); ``clip_text_state_for`` adds it when
the target model wants it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "OPEN_CLIP_PREFIX",
    "IGNORED_OPEN_CLIP_KEYS",
    "count_open_clip_layers",
    "needed_open_clip_keys",
    "open_clip_to_clip_text",
    "clip_text_state_for",
]

OPEN_CLIP_PREFIX = "cond_stage_model.model."
IGNORED_OPEN_CLIP_KEYS = frozenset({"text_projection", "logit_scale", "attn_mask"})

_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# Per-block renames that are one-to-one (the packed in_proj is handled separately).
_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PACKED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_TOP_RENAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}


def count_open_clip_layers(keys: Iterable[str], prefix: str = OPEN_CLIP_PREFIX) -> int:
    """Number of ``transformer.resblocks.{i}`` blocks under ``prefix`` (0 when there are none)."""
    indices = set()
    for key in keys:
        if key.startswith(prefix):
            match = _RESBLOCK.fullmatch(key[len(prefix) :])
            if match:
                indices.add(int(match.group(1)))
    return max(indices) + 1 if indices else 0


def needed_open_clip_keys(keys: Iterable[str], num_layers: int, prefix: str = OPEN_CLIP_PREFIX) -> list[str]:
    """The file keys the conversion reads: everything but dropped blocks and the contrastive head."""
    needed = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        match = _RESBLOCK.fullmatch(name)
        if match:
            if int(match.group(1)) < num_layers:
                needed.append(key)
        elif name in _TOP_RENAMES:
            needed.append(key)
    return needed


def open_clip_to_clip_text(
    state: Mapping[str, torch.Tensor], num_layers: int, prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """Convert ``state`` (OpenCLIP names under ``prefix``) to ``CLIPTextModel`` names.

    Blocks ``>= num_layers`` and the ignored head keys are dropped; any other
    key under ``prefix`` is an error, so a file from another text encoder is
    not silently half-loaded.  Raises ``KeyError`` (unknown key) or
    ``ValueError`` (too few blocks, packed projection not divisible by 3).
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in _TOP_RENAMES:
            converted[_TOP_RENAMES[name]] = tensor
            continue
        if name in IGNORED_OPEN_CLIP_KEYS:
            continue
        match = _RESBLOCK.fullmatch(name)
        if match is None:
            raise KeyError(f"unexpected OpenCLIP text key {key!r}")
        index, rest = int(match.group(1)), match.group(2)
        if index >= num_layers:
            continue
        layer = f"encoder.layers.{index}."
        if rest in _BLOCK_RENAMES:
            converted[layer + _BLOCK_RENAMES[rest]] = tensor
        elif rest in _PACKED:
            if tensor.shape[0] % 3:
                raise ValueError(f"{key} has {tensor.shape[0]} rows, not divisible into q, k, v")
            # in_proj packs [q; k; v] along the output dimension: [3*D, D] and [3*D].
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                converted[f"{layer}self_attn.{part}.{_PACKED[rest]}"] = chunk
        else:
            raise KeyError(f"unexpected OpenCLIP text key {key!r}")
    found = count_open_clip_layers(state, prefix)
    if found < num_layers:
        raise ValueError(f"the text encoder has {found} transformer blocks, the config needs at least {num_layers}")
    return converted


def clip_text_state_for(model_keys: Iterable[str], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``state`` (no ``text_model.`` prefix) to the naming ``model_keys`` use."""
    wants_prefix = any(key.startswith("text_model.") for key in model_keys)
    if not wants_prefix:
        return dict(state)
    return {f"text_model.{key}": tensor for key, tensor in state.items()}
