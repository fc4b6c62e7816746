"""The empty-prompt embedding, computed without tokenizer files (docs/algorithm.md §2.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import SettingsError

if TYPE_CHECKING:  # annotation only; transformers is imported by whoever built the text encoder
    from transformers import CLIPTextModel

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "empty_prompt_token_ids",
    "encode_empty_prompt",
    "batch_prompt_embedding",
]

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = 0  # SD 2's tokenizer pads with "!" (id 0), not with EOS as SD 1.x does


def empty_prompt_token_ids(length: int = 77) -> torch.Tensor:
    """Token ids of ``""`` padded to ``length``: ``[[BOS, EOS, 0, 0, ...]]`` ``[1, length]``."""
    ids = torch.full((1, length), PAD_TOKEN_ID, dtype=torch.long)
    ids[0, 0], ids[0, 1] = BOS_TOKEN_ID, EOS_TOKEN_ID
    return ids


@torch.no_grad()
def encode_empty_prompt(text_encoder: CLIPTextModel) -> torch.Tensor:
    """``[1, 77, hidden]`` float32: the text encoder's last hidden state for ``""``.

    SD 2 takes the penultimate layer of OpenCLIP; the diffusers/transformers
    text encoder of SD 2.x already has that last layer removed (23 layers).
    """
    device = next(text_encoder.parameters()).device
    length = text_encoder.config.max_position_embeddings
    ids = empty_prompt_token_ids(length).to(device)
    return text_encoder(input_ids=ids).last_hidden_state.float()


def batch_prompt_embedding(embedding: torch.Tensor, batch: int, name: str = "prompt") -> torch.Tensor:
    """``[1 or batch, tokens, dim]`` -> ``[batch, tokens, dim]`` (a view when expanded)."""
    if embedding.ndim != 3:
        raise SettingsError(f"{name} embedding must be [B, tokens, dim], got shape {tuple(embedding.shape)}")
    if embedding.shape[0] == batch:
        return embedding
    if embedding.shape[0] == 1:
        return embedding.expand(batch, -1, -1)
    raise SettingsError(f"{name} embedding has batch {embedding.shape[0]}, expected 1 or {batch}")
