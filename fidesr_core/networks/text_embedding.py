"""Prompt embeddings; the released scripts' fixed prompts need no tokenizer files (docs/algorithm.md §2.2, §9).

FiDeSR and PiSA-SR encode ``""``, OSEDiff without tags or a user prompt ``", ,"``: both are
fixed token sequences, spelled out here.  Any other text goes through a CLIP tokenizer
(``fidesr_core.loading.clip_tokenizer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import SettingsError

if TYPE_CHECKING:  # annotation only; transformers is imported by whoever built the text encoder
    from transformers import CLIPTextModel

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "COMMA_TOKEN_ID",
    "FIXED_PROMPT_TOKENS",
    "prompt_token_ids",
    "empty_prompt_token_ids",
    "fixed_prompt_token_ids",
    "encode_token_ids",
    "encode_empty_prompt",
    "batch_prompt_embedding",
]

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = 0  # SD 2's tokenizer pads with "!" (id 0), not with EOS as SD 1.x does
COMMA_TOKEN_ID = 267  # "," as a whole word (",</w>") in CLIP's BPE vocabulary
# Prompt text -> its tokens between BOS and EOS, for the texts the released scripts use without a user prompt.
FIXED_PROMPT_TOKENS: dict[str, tuple[int, ...]] = {"": (), ", ,": (COMMA_TOKEN_ID, COMMA_TOKEN_ID)}


def prompt_token_ids(tokens: Sequence[int], length: int = 77) -> torch.Tensor:
    """``[[BOS, *tokens, EOS, 0, 0, ...]]`` ``[1, length]``, ``tokens`` cut to fit as the tokenizer truncates."""
    body = list(tokens)[: length - 2]
    ids = torch.full((1, length), PAD_TOKEN_ID, dtype=torch.long)
    ids[0, : len(body) + 2] = torch.tensor([BOS_TOKEN_ID, *body, EOS_TOKEN_ID], dtype=torch.long)
    return ids


def empty_prompt_token_ids(length: int = 77) -> torch.Tensor:
    """Token ids of ``""`` padded to ``length``: ``[[BOS, EOS, 0, 0, ...]]`` ``[1, length]``."""
    return prompt_token_ids((), length)


def fixed_prompt_token_ids(text: str, length: int = 77) -> torch.Tensor | None:
    """Token ids of ``text`` when it is one of ``FIXED_PROMPT_TOKENS``; None for any other text."""
    tokens = FIXED_PROMPT_TOKENS.get(text)
    return None if tokens is None else prompt_token_ids(tokens, length)


@torch.no_grad()
def encode_token_ids(text_encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """``[B, 77, hidden]`` float32: the text encoder's last hidden state for token ids ``[B, 77]``.

    SD 2 takes the penultimate layer of OpenCLIP; the diffusers/transformers
    text encoder of SD 2.x already has that last layer removed (23 layers).
    """
    device = next(text_encoder.parameters()).device
    return text_encoder(input_ids=ids.to(device)).last_hidden_state.float()


def encode_empty_prompt(text_encoder: CLIPTextModel) -> torch.Tensor:
    """``[1, 77, hidden]`` float32: the embedding of ``""``."""
    return encode_token_ids(text_encoder, empty_prompt_token_ids(text_encoder.config.max_position_embeddings))


def batch_prompt_embedding(embedding: torch.Tensor, batch: int, name: str = "prompt") -> torch.Tensor:
    """``[1 or batch, tokens, dim]`` -> ``[batch, tokens, dim]`` (a view when expanded)."""
    if embedding.ndim != 3:
        raise SettingsError(f"{name} embedding must be [B, tokens, dim], got shape {tuple(embedding.shape)}")
    if embedding.shape[0] == batch:
        return embedding
    if embedding.shape[0] == 1:
        return embedding.expand(batch, -1, -1)
    raise SettingsError(f"{name} embedding has batch {embedding.shape[0]}, expected 1 or {batch}")
