"""FiDeSR weights (the three U-Net LoRA adapters and the LRRB) and the two files that hold them.

``pkl``: the authors' ``fidesr.pkl`` (SPEC §6), a ``torch.save`` dict with exactly the keys
``unet_lora_encoder_modules``, ``unet_lora_decoder_modules``, ``unet_lora_others_modules``
(lists of U-Net module names), ``lora_rank_unet`` (int), ``state_dict_unet`` (peft names,
``<module>.lora_A.<adapter>.weight`` and ``lora_B``) and ``lrrb_state_dict``.  Read only with
``torch.load(weights_only=True)``; written in the same layout so the authors' scripts load our
files.  The layout has no place for metadata: writing a ``.pkl`` drops it.

``safetensors``: our format, version 1.

- tensors ``unet_lora.<peft name>`` (``unet_lora.down_blocks.0.attentions.0.proj_in.lora_A.default_encoder.weight``)
  and ``lrrb.<LRRB state name>`` (``lrrb.db1.conv1.weight``), each in the dtype it came in (fp32, fp16, bf16);
- string metadata ``fidesr.format`` = ``"fidesr-weights"`` (the marker: files without it are refused),
  ``fidesr.format_version`` = ``"1"``, ``fidesr.lora_rank`` (e.g. ``"8"``), and
  ``fidesr.unet_lora_encoder_modules`` / ``fidesr.unet_lora_decoder_modules`` / ``fidesr.unet_lora_others_modules``
  (JSON lists of module names).  Every other key is free-form metadata (``source``, ``training_step`` ...)
  and comes back in ``FiDeSRWeights.metadata``; ``fidesr.*`` keys are reserved.  The prefix keeps clear of the
  bare ``format`` key other writers use (``"pt"``).

The format is told by content (zip or pickle magic versus a safetensors JSON header), not by the extension.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch

from .checkpoint_inspect import OpenedCheckpoint, identify_checkpoint, identify_model_file
from .errors import ModelFileError, SettingsError, WeightsFileError
from .image_io import write_atomic
from .lora import ADAPTER_NAMES, RELEASED_LORA_ALPHA
from .lrrb import LRRB

__all__ = [
    "FiDeSRWeights", "SAFETENSORS_FORMAT_MARKER", "SAFETENSORS_FORMAT_VERSION", "load_fidesr_weights",
    "save_fidesr_weights", "convert_fidesr_weights", "describe_fidesr_weights", "validate_fidesr_weights",
]  # fmt: skip


@dataclass(eq=False)
class FiDeSRWeights:
    """What a FiDeSR checkpoint holds (SPEC §6).

    ``target_modules`` maps adapter name (``default_encoder`` ...) to U-Net
    module names; ``unet_lora_state`` uses peft names such as
    ``down_blocks.0.attentions.0.proj_in.lora_A.default_encoder.weight``.
    ``file_format`` says what they were read from ("pkl", "safetensors"; "" when built in memory).
    ``lora_alpha``: LoRA scale is ``lora_alpha / lora_rank``; the authors' files carry no alpha
    and their code uses peft's default 8 (see ``lora.py``).
    """

    lora_rank: int
    target_modules: dict[str, list[str]]
    unet_lora_state: dict[str, torch.Tensor]
    lrrb_state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    file_format: str = ""
    lora_alpha: float = RELEASED_LORA_ALPHA


SAFETENSORS_FORMAT_MARKER = "fidesr-weights"
SAFETENSORS_FORMAT_VERSION = 1
_META = "fidesr."  # reserved metadata prefix
_LORA_PREFIX, _LRRB_PREFIX = "unet_lora.", "lrrb."
# The authors' dict keys, in their order; module lists follow ADAPTER_NAMES.
_MODULE_LIST_KEYS = ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
_LIST_KEY_OF = dict(zip(ADAPTER_NAMES, _MODULE_LIST_KEYS, strict=True))  # adapter -> the authors' list key
_PKL_KEYS = (*_MODULE_LIST_KEYS, "lora_rank_unet", "state_dict_unet", "lrrb_state_dict")
_PKL_SUFFIXES = frozenset({".pkl", ".pt", ".pth", ".ckpt", ".bin"})
_SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
_ZIP_MAGIC = b"PK\x03\x04"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")
_BASE_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "dit", "vae-only", "unet-only", "text-encoder-only")
_EXPECTED = "FiDeSR weights (fidesr.pkl from the authors, or a fidesr.safetensors written by this package)"


# --------------------------------------------------------------------------- validation


@cache
def _lrrb_shapes() -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in LRRB().state_dict().items()}


def _tensor_problem(name: str, tensor: object) -> str | None:
    if not isinstance(tensor, torch.Tensor):
        return f"{name} is a {type(tensor).__name__}, expected a tensor"
    if not tensor.is_floating_point():
        return f"{name} has dtype {tensor.dtype}, expected a floating-point tensor"
    # A float64 sum of fp32/fp16/bf16 values cannot overflow, so it is finite exactly when every element is
    # (and it allocates nothing the size of the tensor, unlike isfinite()).
    wide = tensor.dtype == torch.float64
    if not (bool(torch.isfinite(tensor).all()) if wide else math.isfinite(tensor.sum(dtype=torch.float64).item())):
        return f"{name} holds NaN or infinite values (damaged or diverged weights)"
    return None


def _lora_problem(weights: FiDeSRWeights) -> str | None:
    rank, targets = weights.lora_rank, weights.target_modules
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return f"LoRA rank is {rank!r}, expected a positive integer"
    alpha = weights.lora_alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        return f"LoRA alpha is {alpha!r}, expected a positive number"
    if not isinstance(targets, dict) or set(targets) != set(ADAPTER_NAMES):
        names = sorted(targets) if isinstance(targets, dict) else type(targets).__name__
        return f"LoRA adapters are {names}, expected exactly {list(ADAPTER_NAMES)}"
    for adapter, modules in targets.items():
        if not isinstance(modules, list) or not all(isinstance(module, str) for module in modules):
            return f"the module list of {adapter} is not a list of module names"
    if not any(targets.values()):
        return "no U-Net module carries a LoRA (all three module lists are empty)"
    if not isinstance(weights.unet_lora_state, dict):
        return f"the LoRA state is a {type(weights.unet_lora_state).__name__}, expected a dict of tensors"
    listed = {adapter: set(modules) for adapter, modules in targets.items()}
    found: dict[tuple[str, str], set[str]] = {}  # (adapter, module) -> {"A", "B"}
    for key, tensor in weights.unet_lora_state.items():
        match = _LORA_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            return f"LoRA tensor {key!r} is not named <module>.lora_A|lora_B.<adapter>.weight"
        module, part, adapter = match["module"], match["part"], match["adapter"]
        if adapter not in targets:
            return f"LoRA tensor {key} belongs to adapter {adapter!r}, expected one of {list(ADAPTER_NAMES)}"
        if module not in listed[adapter]:
            return f"LoRA tensor {key} is for module {module}, which is not in the {adapter} module list"
        if problem := _tensor_problem(f"LoRA tensor {key}", tensor):
            return problem
        shape = tuple(tensor.shape)  # A: [r, in] or [r, in, kh, kw]; B: [out, r] or [out, r, 1, 1]
        rank_axis = 0 if part == "A" else 1
        if len(shape) not in (2, 4) or shape[rank_axis] != rank:
            return f"LoRA tensor {key} has shape {shape}, expected rank {rank} on axis {rank_axis} (2-D or 4-D)"
        found.setdefault((adapter, module), set()).add(part)
    for adapter, modules in targets.items():
        for module in modules:
            absent = [f"{module}.lora_{part}.{adapter}.weight" for part in "AB" if part not in found.get((adapter, module), ())]  # fmt: skip
            if absent:
                return f"module {module} is in the {adapter} module list but has no tensor {' or '.join(absent)}"
    return None


def _lrrb_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return f"the LRRB state is a {type(state).__name__}, expected a dict of tensors"
    if not state:
        return "there is no LRRB (no LRRB tensors); FiDeSR weights hold the LoRA and the LRRB"
    expected = _lrrb_shapes()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        return (
            f"the LRRB tensors do not match the LRRB architecture (SPEC §3): {len(missing)} missing"
            f"{f' (first: {missing[0]})' if missing else ''}, {len(unexpected)} unexpected"
            f"{f' (first: {unexpected[0]!r})' if unexpected else ''}"
        )
    for key, tensor in state.items():
        if problem := _tensor_problem(f"LRRB tensor {key}", tensor):
            return problem
        if tuple(tensor.shape) != expected[key]:
            return f"LRRB tensor {key} has shape {tuple(tensor.shape)}, expected {expected[key]}"
    return None


def validate_fidesr_weights(weights: FiDeSRWeights, *, source: str = "") -> None:
    """Check that ``weights`` are consistent FiDeSR weights; raise ``WeightsFileError`` naming the first problem.

    Adapters are the three known ones; every LoRA key belongs to a listed module of its
    adapter; every listed module has ``lora_A`` and ``lora_B``; shapes agree with the rank;
    LRRB names and shapes equal ``LRRB().state_dict()``'s; every tensor is finite.
    """
    problem = _lora_problem(weights) or _lrrb_problem(weights.lrrb_state)
    if problem:
        raise WeightsFileError(f"{source or 'FiDeSR weights'}: {problem}")


# --------------------------------------------------------------------------- telling files apart


def _sniff_format(path: Path) -> Literal["pkl", "safetensors"]:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80":  # torch zip archive, or pickle protocol >= 2
        return "pkl"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    raise WeightsFileError(
        f"{path} is neither a PyTorch pickle/zip file nor a safetensors file (it starts with {head!r}); "
        f"expected {_EXPECTED}"
    )


def _base_model_refusal(path: Path, description: str) -> str:
    return (
        f"{path} is a base model ({description}), not FiDeSR weights: it belongs in the base model input "
        f"(base_model / --base); the weights input takes {_EXPECTED}"
    )


def _foreign_checkpoint(path: Path, opened: OpenedCheckpoint) -> str | None:
    """Why a file that is not FiDeSR weights was refused, when it is something we recognise."""
    top, keys = opened.top_keys, list(opened.shapes)
    pisa = sorted(k for k in top if k.endswith(("_pix", "_sem"))) or [k for k in keys if re.search(r"\.default_\w+_(pix|sem)\.", k)][:1]  # fmt: skip
    if pisa:
        return (
            f"{path} is a PiSA-SR checkpoint (pixel/semantic LoRA: {', '.join(pisa[:3])}), not FiDeSR weights; "
            "PiSA-SR weights are not supported by this loader"
        )
    osediff = sorted({"rank_unet", "rank_vae", "vae_lora_encoder_modules", "state_dict_vae"} & top)
    if osediff:
        return (
            f"{path} is an OSEDiff checkpoint ({', '.join(osediff)}), not FiDeSR weights; "
            "OSEDiff weights are not supported by this loader"
        )
    identity = identify_checkpoint(opened)
    if identity.is_sd2 or identity.family.startswith(_BASE_FAMILIES):
        return _base_model_refusal(path, identity.description)
    if identity.family not in ("unknown", "fidesr-weights"):
        return f"{path} is {identity.description}, not FiDeSR weights; expected {_EXPECTED}"
    return None


# --------------------------------------------------------------------------- reading


def _torch_load(path: Path) -> object:
    # torch.load hands paths ending in .safetensors to safetensors: give it the open file then (no mmap).
    by_path = not str(path).endswith(".safetensors")
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices from the weights-only unpickler
            mmap = by_path and handle.read(4) == _ZIP_MAGIC  # zip archives map lazily: a base model costs nothing
            handle.seek(0)
            return torch.load(path if by_path else handle, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL\s+([\w.]+)", str(error))
        if refused:
            raise WeightsFileError(
                f"{path} contains code or Python objects that we refuse to load (it asks for {refused.group(1)!r}); "
                "weights are read with torch.load(weights_only=True), which allows tensors and plain containers "
                f"only, and nothing in the file was run. Expected {_EXPECTED}"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(error) + "\n")
        detail = reason.group(1).strip() if reason else "unreadable pickle"
        raise WeightsFileError(
            f"{path} is a pickle that torch.load(weights_only=True) refuses ({detail}): damaged, or holding "
            f"objects we refuse to load (nothing in it was run); expected {_EXPECTED}"
        ) from None
    except (EOFError, OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
        detail = re.split(r"(?<=\.)\s", str(error).strip() or type(error).__name__)[0][:160]  # first sentence
        raise WeightsFileError(f"{path} is truncated or damaged: it cannot be read as a PyTorch file ({detail}); expected {_EXPECTED}") from None  # fmt: skip


def _owned(value: object) -> object:
    """A copy in fresh memory: memory-mapped tensors must not stay backed by the file."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def _read_pkl(path: Path) -> FiDeSRWeights:
    loaded = _torch_load(path)
    if not isinstance(loaded, dict):
        raise WeightsFileError(f"{path} holds a {type(loaded).__name__}; expected the FiDeSR dict with keys {list(_PKL_KEYS)}")  # fmt: skip
    keys = {str(key) for key in loaded}
    if keys != set(_PKL_KEYS):
        state: object = loaded
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning-style nesting, as base checkpoints have
        tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        opened = OpenedCheckpoint(path, "ckpt (pickle)", {k: tuple(v.shape) for k, v in tensors.items()}, top_keys=frozenset(keys))  # fmt: skip
        if message := _foreign_checkpoint(path, opened):
            raise WeightsFileError(message)
        missing, unexpected = [k for k in _PKL_KEYS if k not in keys], sorted(keys - set(_PKL_KEYS))
        if missing == ["lrrb_state_dict"] and not unexpected:
            raise WeightsFileError(f"{path} has no LRRB (no lrrb_state_dict); FiDeSR weights hold the LoRA and the LRRB")  # fmt: skip
        raise WeightsFileError(
            f"{path} is not a FiDeSR weights file: expected exactly the keys {list(_PKL_KEYS)}; "
            f"missing {missing or 'none'}, unexpected {unexpected[:5] or 'none'}"
        )
    lists = {adapter: loaded[key] for adapter, key in _LIST_KEY_OF.items()}
    lora, lrrb = loaded["state_dict_unet"], loaded["lrrb_state_dict"]
    return FiDeSRWeights(
        lora_rank=loaded["lora_rank_unet"],
        target_modules={a: list(m) if isinstance(m, (list, tuple)) else m for a, m in lists.items()},
        unet_lora_state={k: _owned(v) for k, v in lora.items()} if isinstance(lora, dict) else lora,
        lrrb_state={k: _owned(v) for k, v in lrrb.items()} if isinstance(lrrb, dict) else lrrb,
        file_format="pkl",
    )


def _read_safetensors(path: Path) -> FiDeSRWeights:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = list(handle.keys())
            if metadata.get(_META + "format") != SAFETENSORS_FORMAT_MARKER:
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
                opened = OpenedCheckpoint(path, "safetensors", shapes, metadata=metadata)
                raise WeightsFileError(
                    _foreign_checkpoint(path, opened)
                    or f"{path} is a safetensors file without the FiDeSR format marker (its metadata has no "
                    f"{_META}format = {SAFETENSORS_FORMAT_MARKER!r}); expected {_EXPECTED}"
                )
            tensors = {name: handle.get_tensor(name).clone() for name in names}
    except safetensors.SafetensorError as error:
        raise WeightsFileError(f"{path} is a truncated or damaged safetensors file ({error}); expected {_EXPECTED}") from None  # fmt: skip
    absent = [_META + key for key in ("format_version", "lora_rank", *_MODULE_LIST_KEYS) if _META + key not in metadata]
    if absent:
        raise WeightsFileError(f"{path}: the FiDeSR safetensors metadata lacks {absent} (damaged or hand-edited file)")
    if (version := metadata[_META + "format_version"]) != str(SAFETENSORS_FORMAT_VERSION):
        raise WeightsFileError(f"{path} is FiDeSR safetensors format version {version!r}; this package reads version {SAFETENSORS_FORMAT_VERSION}")  # fmt: skip
    try:
        rank = int(metadata[_META + "lora_rank"])
        alpha = float(metadata.get(_META + "lora_alpha", RELEASED_LORA_ALPHA))
        lists = {adapter: json.loads(metadata[_META + key]) for adapter, key in _LIST_KEY_OF.items()}
    except (ValueError, json.JSONDecodeError) as error:
        raise WeightsFileError(f"{path}: FiDeSR safetensors metadata is malformed ({error})") from None
    stray = [name for name in names if not name.startswith((_LORA_PREFIX, _LRRB_PREFIX))]
    if stray:
        raise WeightsFileError(f"{path} holds tensor {stray[0]!r}; expected only names starting with {_LORA_PREFIX!r} or {_LRRB_PREFIX!r}")  # fmt: skip
    return FiDeSRWeights(
        lora_rank=rank,
        target_modules=lists,
        unet_lora_state={k.removeprefix(_LORA_PREFIX): v for k, v in tensors.items() if k.startswith(_LORA_PREFIX)},
        lrrb_state={k.removeprefix(_LRRB_PREFIX): v for k, v in tensors.items() if k.startswith(_LRRB_PREFIX)},
        metadata={k: v for k, v in metadata.items() if not k.startswith(_META)},
        file_format="safetensors",
        lora_alpha=alpha,
    )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise WeightsFileError(f"{path} does not exist; expected {_EXPECTED}")
    if path.is_dir():
        try:
            identity = identify_model_file(path)  # reads JSON configs only
        except ModelFileError:
            identity = None
        if identity is not None and identity.family != "unknown":
            raise WeightsFileError(_base_model_refusal(path, identity.description))
        raise WeightsFileError(f"{path} is a folder; expected a file with {_EXPECTED}")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes): an incomplete download or copy? Expected {_EXPECTED}")


def load_fidesr_weights(path: str | os.PathLike) -> FiDeSRWeights:
    """Read the authors' ``fidesr.pkl`` (unchanged) or our ``.safetensors``; the format is told by content.

    Tensors keep their stored dtype and end up on the CPU.  Raises ``WeightsFileError``
    naming the file and what was expected.
    """
    path = Path(path).expanduser()
    _check_readable(path)
    weights = _read_pkl(path) if _sniff_format(path) == "pkl" else _read_safetensors(path)
    validate_fidesr_weights(weights, source=str(path))
    return weights


# --------------------------------------------------------------------------- writing


def _format_from_extension(path: Path) -> Literal["pkl", "safetensors"]:
    suffix = path.suffix.lower()
    if suffix in _PKL_SUFFIXES:
        return "pkl"
    if suffix in _SAFETENSORS_SUFFIXES:
        return "safetensors"
    raise SettingsError(f"{path}: cannot tell the weights format from the extension {suffix or '(none)'!r}; use .pkl or .safetensors")  # fmt: skip


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy in the same dtype (views of larger storages would be written whole)."""
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _pkl_payload(weights: FiDeSRWeights, path: Path) -> dict[str, object]:
    if weights.lora_alpha != RELEASED_LORA_ALPHA:
        raise SettingsError(
            f"{path}: the authors' .pkl layout has no LoRA alpha (their code always uses {RELEASED_LORA_ALPHA}), "
            f"but these weights use {weights.lora_alpha}; save them as .safetensors"
        )
    payload: dict[str, object] = {key: list(weights.target_modules[a]) for a, key in _LIST_KEY_OF.items()}
    payload["lora_rank_unet"] = int(weights.lora_rank)
    payload["state_dict_unet"] = {key: _plain(value) for key, value in weights.unet_lora_state.items()}
    payload["lrrb_state_dict"] = {key: _plain(value) for key, value in weights.lrrb_state.items()}
    return payload


def _safetensors_payload(weights: FiDeSRWeights, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    reserved = sorted(key for key in weights.metadata if not isinstance(key, str) or key.startswith(_META))
    if reserved:
        raise SettingsError(f"{path}: metadata key {reserved[0]!r} is reserved for the file format ({_META}*)")
    tensors = {_LORA_PREFIX + key: _plain(value) for key, value in weights.unet_lora_state.items()}
    tensors |= {_LRRB_PREFIX + key: _plain(value) for key, value in weights.lrrb_state.items()}
    metadata = {str(key): str(value) for key, value in weights.metadata.items()}
    metadata[_META + "format"] = SAFETENSORS_FORMAT_MARKER
    metadata[_META + "format_version"] = str(SAFETENSORS_FORMAT_VERSION)
    metadata[_META + "lora_rank"] = str(weights.lora_rank)
    metadata[_META + "lora_alpha"] = repr(float(weights.lora_alpha))
    for adapter, key in _LIST_KEY_OF.items():
        metadata[_META + key] = json.dumps(list(weights.target_modules[adapter]))
    return tensors, metadata


def save_fidesr_weights(
    weights: FiDeSRWeights, path: str | os.PathLike, *, file_format: Literal["safetensors", "pkl"] | None = None
) -> None:
    """Write ``weights`` atomically (temp file in the same folder, then ``os.replace``).

    ``file_format`` defaults to the extension's (.pkl/.pt/.pth/.ckpt/.bin or .safetensors).
    A ``.pkl`` is exactly the authors' layout (metadata is dropped); invalid weights are refused.
    """
    path = Path(path).expanduser()
    chosen = file_format or _format_from_extension(path)
    if chosen not in ("pkl", "safetensors"):
        raise SettingsError(f"weights file format {chosen!r} is not one of 'pkl', 'safetensors'")
    validate_fidesr_weights(weights, source=f"weights to be written to {path}")
    if chosen == "pkl":
        payload = _pkl_payload(weights, path)
        write_atomic(path, lambda temp: torch.save(payload, temp))
    else:
        tensors, metadata = _safetensors_payload(weights, path)
        write_atomic(path, lambda temp: safetensors.torch.save_file(tensors, temp, metadata=metadata))


def convert_fidesr_weights(source: str | os.PathLike, destination: str | os.PathLike) -> FiDeSRWeights:
    """Read ``source`` and write it to ``destination`` in the format of its extension; returns what was read.

    Going to safetensors records ``converted_from`` (the source file name) unless metadata already has it.
    """
    destination = Path(destination).expanduser()
    destination_format = _format_from_extension(destination)
    weights = load_fidesr_weights(source)
    if destination_format == "safetensors":
        weights.metadata.setdefault("converted_from", Path(source).name)
    save_fidesr_weights(weights, destination, file_format=destination_format)
    return weights


# --------------------------------------------------------------------------- describing


def describe_fidesr_weights(weights: FiDeSRWeights) -> dict[str, object]:
    """A summary for ``fidesr info`` and ``doctor``: format, rank, modules per adapter, sizes, dtypes, metadata."""
    formats = {"pkl": "pkl (the authors' torch.save layout)", "safetensors": f"safetensors ({SAFETENSORS_FORMAT_MARKER} v{SAFETENSORS_FORMAT_VERSION})"}  # fmt: skip
    tensors = [*weights.unet_lora_state.values(), *weights.lrrb_state.values()]
    return {
        "format": formats.get(weights.file_format, "in memory"),
        "lora_rank": weights.lora_rank,
        "lora_alpha": weights.lora_alpha,
        "lora_modules": {adapter: len(weights.target_modules.get(adapter, [])) for adapter in ADAPTER_NAMES},
        "lora_parameters": sum(tensor.numel() for tensor in weights.unet_lora_state.values()),
        "lrrb_parameters": sum(tensor.numel() for tensor in weights.lrrb_state.values()),
        "dtypes": ", ".join(sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors})),
        "metadata": dict(weights.metadata),
    }
