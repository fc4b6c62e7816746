"""Prompts: the fixed token sequences, the CLIP tokenizer the package ships, and a diffusers folder's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from fidesr_core.loading.clip_tokenizer import BUNDLED_TOKENIZER_DIR, load_clip_tokenizer, prompt_ids, tokenizer_folder
from fidesr_core.networks.families import OSEDIFF_RECIPE, PISA_SR_RECIPE
from fidesr_core.networks.text_embedding import FIXED_PROMPT_TOKENS, fixed_prompt_token_ids


def test_bundled_vocabulary_is_clips() -> None:
    vocab = json.loads((BUNDLED_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (BUNDLED_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and len(set(vocab.values())) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    # one token per merge, in merge order, after the 2 x 256 byte symbols
    for index in (1, 1000, 48894):
        assert vocab["".join(merges[index].split())] == 511 + index
    assert (BUNDLED_TOKENIZER_DIR / "LICENSE-open_clip.txt").read_text().count("Permission is hereby granted") == 1


@pytest.mark.parametrize("text", sorted(FIXED_PROMPT_TOKENS))
def test_fixed_prompts_equal_the_tokenizer(text: str) -> None:
    tokenizer = load_clip_tokenizer()
    expected = tokenizer(text, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(fixed_prompt_token_ids(text), expected)


def test_released_prompt_texts() -> None:
    assert PISA_SR_RECIPE.prompt_text() == "" and PISA_SR_RECIPE.prompt_text("a cat") == "a cat"
    assert OSEDIFF_RECIPE.prompt_text() == ", ," and OSEDIFF_RECIPE.prompt_text("a cat") == ", a cat,"


def test_user_prompt_is_tokenized_padded_and_truncated() -> None:
    ids = prompt_ids(", a photo of a dog,")
    assert ids.shape == (1, 77) and ids[0, 0] == 49406
    body = ids[0, 1 : int((ids[0] == 49407).nonzero()[0])]
    assert body.tolist()[0] == body.tolist()[-1] == 267 and len(body) == 7  # , a photo of a dog ,
    assert int(ids[0, -1]) == 0  # padded with "!"
    long = prompt_ids("word " * 200)
    assert long.shape == (1, 77) and int(long[0, -1]) == 49407  # truncated, EOS kept


def test_a_diffusers_folders_tokenizer_is_preferred(tmp_path: Path) -> None:
    assert tokenizer_folder(None) == BUNDLED_TOKENIZER_DIR
    assert tokenizer_folder(tmp_path) == BUNDLED_TOKENIZER_DIR  # no tokenizer/ there
    folder = tmp_path / "tokenizer"
    shutil.copytree(BUNDLED_TOKENIZER_DIR, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, pad_token="<|endoftext|>")))
    assert tokenizer_folder(tmp_path) == folder
    # SD 1.x-style padding with EOS shows that this folder's tokenizer was used
    assert int(prompt_ids("a cat", base_path=tmp_path)[0, -1]) == 49407
    assert isinstance(load_clip_tokenizer(tmp_path), CLIPTokenizer)
