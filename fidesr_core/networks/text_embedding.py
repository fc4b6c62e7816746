"""Prompt embeddings (docs/algorithm.md §2.2, §9.4): the text encoder's last hidden state of token ids from SD 2's
CLIP tokenizer (``loading.clip_tokenizer``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import SettingsError

if TYPE_CHECKING:  # annotation only; transformers is imported by whoever built the text encoder
    from transformers import CLIPTextModel


@torch.no_grad()
def encode_token_ids(text_encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """``[B, 77, hidden]`` float32: the text encoder's last hidden state for token ids ``[B, 77]`` (SD 2 takes
    OpenCLIP's penultimate layer; the diffusers text encoder of SD 2.x already lacks the last one)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(input_ids=ids.to(device)).last_hidden_state.float()


def batch_prompt_embedding(embedding: torch.Tensor, batch: int, name: str = "prompt") -> torch.Tensor:
    """``[1 or batch, tokens, dim]`` -> ``[batch, tokens, dim]`` (a view when expanded)."""
    if embedding.ndim != 3:
        raise SettingsError(f"{name} embedding must be [B, tokens, dim], got shape {tuple(embedding.shape)}")
    if embedding.shape[0] == batch:
        return embedding
    if embedding.shape[0] == 1:
        return embedding.expand(batch, -1, -1)
    raise SettingsError(f"{name} embedding has batch {embedding.shape[0]}, expected 1 or {batch}")
