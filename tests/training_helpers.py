"""Helpers for the trainer tests: a tiny folder of HQ photos with captions and a tiny CLIP tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_tokenizer", "write_training_workspace"]


def write_tokenizer(folder: Path) -> Path:
    """A tiny CLIP BPE vocabulary: single letters and ',' (ids < 49408 so the tiny text encoder can embed them)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0}
    for index, char in enumerate("abcdefghijklmnopqrstuvwxyz,"):
        vocab[char], vocab[f"{char}</w>"] = 1 + 2 * index, 2 + 2 * index
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def write_training_workspace(root: Path) -> dict[str, Path]:
    """``root/hq`` (three smooth noisy photos, one smaller than a 32 crop, two with captions) and a tokenizer."""
    hq = root / "hq"
    hq.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(40, 48), (48, 40), (24, 36)]):
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = np.stack([np.sin(xx / (3 + index)), np.cos(yy / 4), np.sin((xx + yy) / 5)], -1) * 0.4 + 0.5
        pixels = np.clip(smooth + 0.1 * rng.standard_normal((height, width, 3)), 0, 1)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(hq / f"{index}.png")
    (hq / "0.txt").write_text("a red dog")
    (hq / "1.txt").write_text("grass, sky")
    return {"root": root, "hq": hq, "tokenizer": write_tokenizer(root / "tokenizer")}
