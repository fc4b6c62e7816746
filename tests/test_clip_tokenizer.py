"""Prompts: every one through SD 2's CLIP tokenizer, the one the package ships or a diffusers folder's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from fidesr_core.loading.clip_tokenizer import BUNDLED_TOKENIZER_DIR, load_clip_tokenizer, prompt_ids, tokenizer_folder
from fidesr_core.loading.restorer import prompt_embedding_for
from fidesr_core.networks.families import OSEDIFF_RECIPE, PISA_SR_RECIPE
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.text_embedding import encode_token_ids
from fidesr_core.networks.tiny import tiny_base_model

# The released prompts' token ids (docs/algorithm.md §2.2, §9.3): BOS, the text's tokens (",</w>" = 267), EOS,
# then SD 2's padding "!" (id 0) up to 77.
RELEASED_PROMPT_IDS = {"": [49406, 49407], ", ,": [49406, 267, 267, 49407]}


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


@pytest.mark.parametrize("text", sorted(RELEASED_PROMPT_IDS))
def test_released_prompts_tokenize_to_their_ids(text: str) -> None:
    ids = RELEASED_PROMPT_IDS[text]
    assert prompt_ids(text).tolist() == [ids + [0] * (77 - len(ids))]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("family", "text"), [("fidesr", ""), ("pisa-sr", ""), ("osediff", ", ,")])
def test_released_prompt_embeddings_are_those_of_the_ids(family: str, text: str) -> None:
    """Bit for bit the embedding of the ids the released scripts' tokenizer gives (once spelled out in the code)."""
    base = tiny_base_model(seed=1)
    ids = RELEASED_PROMPT_IDS[text]
    expected = encode_token_ids(base.text_encoder, torch.tensor([ids + [0] * (77 - len(ids))]))
    assert torch.equal(prompt_embedding_for(base, family), expected)
    other = prompt_embedding_for(base, "osediff" if family != "osediff" else "fidesr")
    assert not torch.equal(other, expected)


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
    assert int(prompt_ids("a cat", folder)[0, -1]) == 49407
    assert isinstance(load_clip_tokenizer(folder), CLIPTokenizer)
    # a base model loaded from that folder tokenizes its released prompt with it
    base = tiny_base_model(seed=1)
    own = BaseModel(base.unet, base.vae, base.text_encoder, str(tmp_path), "test", tokenizer_dir=str(folder))
    assert not torch.equal(prompt_embedding_for(own, "fidesr"), prompt_embedding_for(base, "fidesr"))
