"""Write the CLIP tokenizer files the package ships, from the BPE vocabulary in the open_clip_torch wheel.

Stable Diffusion 2's tokenizer is CLIP's byte-level BPE (49 408 tokens, MIT licence) with ``!``
as the padding token. A single-file checkpoint has no tokenizer, so the package ships it as
``vocab.json`` and ``merges.txt`` under ``fidesr_core/loading/configs/sd21_base/tokenizer/``, the
layout of a diffusers folder's ``tokenizer/``. Run once when the files need making again::

    pip download open_clip_torch --no-deps -d /tmp/wheel
    python tools/extract_clip_vocabulary.py /tmp/wheel/open_clip_torch-*.whl

The vocabulary follows CLIP's construction: the 256 byte symbols, the same with the end-of-word
mark ``</w>``, one token per merge (the first 48 894 merge lines of the file) and the two special
tokens ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

VOCABULARY_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
LICENCE_SUFFIX = ".dist-info/licenses/LICENSE"
MERGE_COUNT = 49152 - 256 - 2  # CLIP's vocabulary size minus the byte symbols and the two special tokens
DESTINATION = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base" / "tokenizer"


def byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-to-character table: printable bytes map to themselves, the rest to 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = {byte: byte for byte in printable}, 0
    for byte in range(256):
        if byte not in codes:
            codes[byte] = 256 + extra
            extra += 1
    ordered = printable + [byte for byte in range(256) if byte not in printable]
    return [chr(codes[byte]) for byte in ordered]


def build(vocabulary_gz: bytes) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(vocabulary_gz).decode("utf-8").split("\n")
    merges = lines[1 : MERGE_COUNT + 1]  # line 0 is a version header
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="open_clip_torch-*.whl")
    args = parser.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel:
        vocabulary = wheel.read(VOCABULARY_MEMBER)
        licence = next(name for name in wheel.namelist() if name.endswith(LICENCE_SUFFIX))
        licence_text = wheel.read(licence).decode("utf-8")
    vocab, merges = build(vocabulary)
    DESTINATION.mkdir(parents=True, exist_ok=True)
    (DESTINATION / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (DESTINATION / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (DESTINATION / "LICENSE-open_clip.txt").write_text(licence_text, encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {DESTINATION}")


if __name__ == "__main__":
    main()
