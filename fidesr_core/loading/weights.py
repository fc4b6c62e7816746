"""The weights of the three families, read, checked, written and described by one code over the layout table
(docs/algorithm.md §6, §9).  Pickles are read only through ``torch.load(weights_only=True)``, each once; a
``.pkl`` is written with exactly the authors' keys; every write is atomic and refuses invalid weights.
"""

from __future__ import annotations

import json
import math
import os
from functools import cache
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch

from ..atomic_write import write_atomic
from ..errors import ModelFileError, SettingsError, WeightsFileError
from ..networks.families import FAMILY_NAMES, LoraSet, RestorerWeights
from ..networks.lora import PEFT_KEY, RELEASED_LORA_ALPHA
from ..networks.lrrb import LRRB
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_header, read_tensors
from .identify import ModelIdentity, identify_header, identify_model_file
from .layouts import FORMAT_VERSION, LAYOUTS, META, Layout, adapter_of, family_of

_EXPECTED = "FiDeSR, PiSA-SR or OSEDiff weights (the authors' .pkl, or a .safetensors written by this package)"
_CONV_IN_NAMES = ("conv_in.base_layer.", "conv_in.")  # OSEDiff's: peft's name when conv_in carries a LoRA, else plain


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def _owned(value: object, what: str, path: Path) -> dict:
    """Copies in fresh memory of a pickle's dict of tensors (memory-mapped ones must not stay backed by the file)."""
    if not isinstance(value, dict):
        raise WeightsFileError(f"{path}: {what} is a {type(value).__name__}, expected a dict of tensors")
    return {key: tensor.clone() if isinstance(tensor, torch.Tensor) else tensor for key, tensor in value.items()}


def _claim(sources: dict[str, dict], layout: Layout) -> dict[str, dict]:
    """Each set's tensors out of the dicts that hold them (pkl key or safetensors prefix -> {name: tensor}), by
    adapter; a tensor of no set's adapter goes to the first set, whose check then refuses it."""
    states = {s.part: {} for s in layout.sets}
    for where, tensors in sources.items():
        sets = [s for s in layout.sets if where in (s.state_key, s.prefix)]
        for name, tensor in tensors.items():
            states[next((s for s in sets if adapter_of(name) in s.lists), sets[0]).part][name] = tensor
    return states


def _from_pickle(path: Path, loaded: dict, layout: Layout) -> RestorerWeights:
    name, expected = FAMILY_NAMES[layout.family], layout.pkl_keys
    keys = {str(key) for key in loaded}
    missing, unexpected = [key for key in expected if key not in keys], sorted(keys - set(expected))
    if missing or unexpected:
        absent = [f"the {label} is missing" for label, own in layout.part_keys().items() if own and own <= {*missing}]
        raise WeightsFileError(
            f"{path} holds {name} weights{': ' + ', '.join(absent) if absent else ''}; expected the keys "
            f"{list(expected)}: missing {missing or 'none'}, unexpected {unexpected[:5] or 'none'}"
        )
    sources = {key: _owned(loaded[key], key, path) for key in {s.state_key for s in layout.sets}}
    conv_in = {}
    if "conv_in_state" in layout.extras:
        unet = sources["state_dict_unet"]
        for key in [key for key in unet if key.startswith(_CONV_IN_NAMES) and adapter_of(key) is None]:
            conv_in[key.removeprefix("conv_in.base_layer.").removeprefix("conv_in.")] = unet.pop(key)
    states = _claim(sources, layout)
    lora = {
        s.part: LoraSet(loaded[s.rank_key], {a: _as_list(loaded[key]) for a, key in s.lists.items()}, states[s.part])
        for s in layout.sets
    }
    weights = RestorerWeights(layout.family, lora, conv_in_state=conv_in, file_format="pkl")
    if "lrrb_state" in layout.extras:
        lrrb = loaded["lrrb_state_dict"]
        weights.lrrb_state = _owned(lrrb, "lrrb_state_dict", path) if isinstance(lrrb, dict) else lrrb
    return weights


def _from_safetensors(path: Path, metadata: dict[str, str], names: list[str], layout: Layout) -> RestorerWeights:
    name = FAMILY_NAMES[layout.family]
    if (version := metadata.get(META + "format_version")) != str(FORMAT_VERSION):
        raise WeightsFileError(
            f"{path} is {name} safetensors format version {version!r}; this package reads version {FORMAT_VERSION}"
        )
    needed = [META + key for s in layout.sets for key in (s.meta_rank, *s.lists.values())]
    if absent := [key for key in needed if key not in metadata]:
        raise WeightsFileError(f"{path}: the safetensors metadata lacks {absent} (damaged or hand-edited file)")
    prefixes = tuple(dict.fromkeys([s.prefix for s in layout.sets] + [p for _, _, p in layout.extras.values()]))
    if stray := [tensor for tensor in names if not tensor.startswith(prefixes)]:
        raise WeightsFileError(f"{path} holds tensor {stray[0]!r}; expected only names starting with {prefixes}")
    tensors = read_tensors(path, names)
    grouped = {p: {k.removeprefix(p): v for k, v in tensors.items() if k.startswith(p)} for p in prefixes}
    states = _claim({s.prefix: grouped[s.prefix] for s in layout.sets}, layout)
    try:
        lora = {
            s.part: LoraSet(
                int(metadata[META + s.meta_rank]),
                {a: json.loads(metadata[META + key]) for a, key in s.lists.items()},
                states[s.part],
                float(metadata.get(META + s.meta_alpha, RELEASED_LORA_ALPHA)),
            )
            for s in layout.sets
        }
    except ValueError as error:  # json.JSONDecodeError included
        raise WeightsFileError(f"{path}: the {name} safetensors metadata is malformed ({error})") from None
    extras = {attribute: grouped[prefix] for attribute, (_, _, prefix) in layout.extras.items()}
    free = {key: value for key, value in metadata.items() if not key.startswith(META)}
    return RestorerWeights(layout.family, lora, **extras, metadata=free, file_format="safetensors")


def _not_weights(path: Path, identity: ModelIdentity, family: str | None) -> str:
    if identity.family.is_base_model or identity.is_sd2:
        return (
            f"{path} is a base model ({identity.description}), not restorer weights: it belongs in the base model "
            f"input (base_model / --base); the weights input takes {_EXPECTED}"
        )
    if family is not None:  # someone else's .safetensors with peft adapter names
        return (
            f"{path} is a safetensors file without our format marker ({META}format): it looks like "
            f"{FAMILY_NAMES[family]} weights written by other code; expected {_EXPECTED}"
        )
    return f"{path} is {identity.description}; expected {_EXPECTED}"


def load_restorer_weights(path: str | os.PathLike) -> RestorerWeights:
    """FiDeSR, PiSA-SR or OSEDiff weights from the authors' .pkl or our .safetensors, told apart by content: on
    the CPU in their stored dtype, in memory of their own; ``WeightsFileError`` naming the file and the fault."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            raise WeightsFileError(_not_weights(path, identify_model_file(path), None))
        header, loaded = read_header(path)
        family = family_of(header)
        layout = LAYOUTS[family] if family else None
        if layout is None or (loaded is None and header.metadata.get(META + "format") != layout.marker):
            raise WeightsFileError(_not_weights(path, identify_header(header), family))
        if loaded is not None:
            weights = _from_pickle(path, loaded, layout)
        else:
            weights = _from_safetensors(path, header.metadata, list(header.shapes), layout)
    except WeightsFileError:
        raise
    except ModelFileError as error:
        raise WeightsFileError(f"{error}; expected {_EXPECTED}") from None
    validate_weights(weights, source=str(path))
    return weights


@cache
def _lrrb_shapes() -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in LRRB().state_dict().items()}


def _tensor_problem(name: str, tensor: object) -> str | None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return f"{name} is a {getattr(tensor, 'dtype', type(tensor).__name__)}, expected a floating-point tensor"
    # A float64 sum of fp32/fp16/bf16 values is finite exactly when every element is (and allocates nothing).
    wide = tensor.dtype == torch.float64
    if not (bool(torch.isfinite(tensor).all()) if wide else math.isfinite(tensor.sum(dtype=torch.float64).item())):
        return f"{name} holds NaN or infinite values (damaged or diverged weights)"
    return None


def _lora_problem(lora: LoraSet, adapters: list[str], network: str) -> str | None:
    """The first problem of one LoRA set: rank, alpha, module lists, peft names, shapes against the rank, values."""
    rank, alpha, targets, state = lora.rank, lora.alpha, lora.target_modules, lora.state
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return f"LoRA rank is {rank!r}, expected a positive integer"
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        return f"LoRA alpha is {alpha!r}, expected a positive number"
    if not isinstance(targets, dict) or set(targets) != set(adapters):
        return f"LoRA adapters are {sorted(targets) if isinstance(targets, dict) else targets!r}, expected exactly {adapters}"
    if not all(isinstance(m, list) and all(isinstance(n, str) for n in m) for m in targets.values()):
        return "a module list is not a list of module names"
    if not any(targets.values()):
        return f"no {network} module carries a LoRA (the module lists are empty)"
    if not isinstance(state, dict):
        return f"the LoRA state is a {type(state).__name__}, expected a dict of tensors"
    found: dict[tuple[str, str], set[str]] = {}  # (adapter, module) -> {"A", "B"}
    for key, tensor in state.items():
        match = PEFT_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            return f"LoRA tensor {key!r} is not named <module>.lora_A|lora_B.<adapter>.weight"
        module, part, adapter = match["module"], match["part"], match["adapter"]
        if adapter not in targets:
            return f"LoRA tensor {key} belongs to none of the adapters {adapters}"
        if module not in targets[adapter]:
            return f"LoRA tensor {key} is for module {module}, which is not in the {adapter} module list"
        if problem := _tensor_problem(f"LoRA tensor {key}", tensor):
            return problem
        shape, axis = tuple(tensor.shape), 0 if part == "A" else 1  # A: [r, in(, kh, kw)]; B: [out, r(, 1, 1)]
        if len(shape) not in (2, 4) or shape[axis] != rank:
            return f"LoRA tensor {key} has shape {shape}, expected rank {rank} on axis {axis} (2-D or 4-D)"
        found.setdefault((adapter, module), set()).add(part)
    for adapter, modules in targets.items():
        for module in modules:
            if absent := [p for p in "AB" if p not in found.get((adapter, module), ())]:
                return f"module {module} is in the {adapter} module list but has no tensor lora_{'/'.join(absent)}"
    return None


def _state_problem(attribute: str, label: str, state: object) -> str | None:
    if not isinstance(state, dict) or not state:
        return f"the {label} is missing" + (f" ({type(state).__name__}, expected a dict of tensors)" if state else "")
    expected = _lrrb_shapes() if attribute == "lrrb_state" else {"weight": None, "bias": None}
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return (
            f"the {label} tensors do not match: missing {missing[:3] or 'none'}, unexpected {unexpected[:3] or 'none'}"
        )
    for key, tensor in state.items():
        if problem := _tensor_problem(f"{label} tensor {key}", tensor):
            return problem
        if expected[key] is not None and tuple(tensor.shape) != expected[key]:
            return f"{label} tensor {key} has shape {tuple(tensor.shape)}, expected {expected[key]}"
    return None


def validate_weights(weights: RestorerWeights, *, source: str = "") -> None:
    """Raise ``WeightsFileError`` (``"<source>: <first problem>"``) unless every part of ``weights`` is sound: each
    LoRA set exactly its adapters, both halves of every listed module and nothing else, shapes that agree with
    the rank; the LRRB ``LRRB()``'s names and shapes; OSEDiff's conv_in a weight and a bias; finite values."""
    layout = LAYOUTS[weights.family]
    problem = None
    for s in layout.sets:
        lora = weights.lora.get(s.part)
        if not isinstance(lora, LoraSet) or (isinstance(lora.state, dict) and not lora.state):
            problem = f"the {s.label} is missing: there are no tensors of its adapters {', '.join(s.lists)}"
        elif found := _lora_problem(lora, list(s.lists), s.network):
            problem = f"the {s.label}: {found}"
        if problem:
            break
    for attribute, (label, _, _) in layout.extras.items():
        problem = problem or _state_problem(attribute, label, getattr(weights, attribute))
    if problem:
        name = FAMILY_NAMES[weights.family]
        raise WeightsFileError(f"{source}: {name} weights: {problem}" if source else f"{name} weights: {problem}")


def _format_of(path: Path) -> Literal["pkl", "safetensors"]:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES or suffix in SAFETENSORS_SUFFIXES:
        return "pkl" if suffix in PICKLE_SUFFIXES else "safetensors"
    raise SettingsError(
        f"{path}: cannot tell the weights format from the extension {suffix or '(none)'!r}; use .pkl or .safetensors"
    )


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A compact CPU copy in the same dtype (views of larger storages would be written whole)."""
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _pkl_payload(weights: RestorerWeights, layout: Layout, path: Path) -> dict[str, object]:
    payload: dict[str, object] = {}
    for s in layout.sets:
        lora = weights.lora[s.part]
        if lora.alpha != RELEASED_LORA_ALPHA:
            raise SettingsError(
                f"{path}: the authors' .pkl layout has no LoRA alpha (their code always uses {RELEASED_LORA_ALPHA}), "
                f"but the {s.label} uses {lora.alpha}; save it as .safetensors"
            )
        payload |= {key: list(lora.target_modules[a]) for a, key in s.lists.items()}
        payload[s.rank_key] = int(lora.rank)
    for s in layout.sets:
        state = payload.setdefault(s.state_key, {})
        state.update({k: _compact(v) for k, v in weights.lora[s.part].state.items()})
    if weights.conv_in_state:  # under peft's wrapper name when conv_in carries a LoRA, as the released trainer saves
        wrapped = "conv_in" in weights.lora["unet"].target_modules.get("default_encoder", [])
        prefix = "conv_in.base_layer." if wrapped else "conv_in."
        payload["state_dict_unet"] |= {prefix + k: _compact(v) for k, v in weights.conv_in_state.items()}
    if "lrrb_state" in layout.extras:
        payload["lrrb_state_dict"] = {k: _compact(v) for k, v in weights.lrrb_state.items()}
    return payload


def _safetensors_payload(weights: RestorerWeights, layout: Layout, path: Path) -> tuple[dict, dict[str, str]]:
    if reserved := sorted(key for key in weights.metadata if not isinstance(key, str) or key.startswith(META)):
        raise SettingsError(f"{path}: metadata key {reserved[0]!r} is reserved for the file format ({META}*)")
    metadata = {str(key): str(value) for key, value in weights.metadata.items()}
    metadata |= {META + "format": layout.marker, META + "format_version": str(FORMAT_VERSION)}
    tensors: dict[str, torch.Tensor] = {}
    for s in layout.sets:
        lora = weights.lora[s.part]
        metadata |= {META + s.meta_rank: str(lora.rank), META + s.meta_alpha: repr(float(lora.alpha))}
        metadata |= {META + key: json.dumps(list(lora.target_modules[a])) for a, key in s.lists.items()}
        tensors |= {s.prefix + k: _compact(v) for k, v in lora.state.items()}
    for attribute, (_, _, prefix) in layout.extras.items():
        tensors |= {prefix + k: _compact(v) for k, v in getattr(weights, attribute).items()}
    return tensors, metadata


def save_restorer_weights(
    weights: RestorerWeights, path: str | os.PathLike, *, file_format: Literal["safetensors", "pkl"] | None = None
) -> None:
    """Write ``weights`` atomically; the format follows the extension (.pkl/.pt/.pth/.ckpt/.bin or .safetensors)
    unless ``file_format`` is given.  A ``.pkl`` is exactly the authors' layout (metadata dropped); invalid
    weights are refused."""
    path = Path(path).expanduser()
    chosen = file_format or _format_of(path)
    if chosen not in ("pkl", "safetensors"):
        raise SettingsError(f"weights file format {chosen!r} is not one of 'pkl', 'safetensors'")
    validate_weights(weights, source=f"weights to be written to {path}")
    layout = LAYOUTS[weights.family]
    if chosen == "pkl":
        payload = _pkl_payload(weights, layout, path)
        write_atomic(path, lambda temp: torch.save(payload, temp))
    else:
        tensors, metadata = _safetensors_payload(weights, layout, path)
        write_atomic(path, lambda temp: safetensors.torch.save_file(tensors, temp, metadata=metadata))


def convert_restorer_weights(source: str | os.PathLike, destination: str | os.PathLike) -> RestorerWeights:
    """Read ``source`` and write it to ``destination`` in the format of its extension; returns what was read.
    Going to safetensors records ``converted_from`` (the source file name) unless metadata already has it."""
    destination = Path(destination).expanduser()
    destination_format = _format_of(destination)
    weights = load_restorer_weights(source)
    if destination_format == "safetensors":
        weights.metadata.setdefault("converted_from", Path(source).name)
    save_restorer_weights(weights, destination, file_format=destination_format)
    return weights


def describe_restorer_weights(weights: RestorerWeights) -> dict[str, object]:
    """A summary for ``fidesr info`` and ``doctor``: family, format, each LoRA set's rank and size, the
    parameters of the other parts, dtypes and metadata."""
    layout = LAYOUTS[weights.family]
    formats = {"": "in memory", "pkl": "pkl (the authors' torch.save layout)"}
    formats["safetensors"] = f"safetensors ({layout.marker} v1)"
    summary: dict[str, object] = {"family": FAMILY_NAMES[weights.family], "format": formats[weights.file_format]}
    tensors = []
    for part, lora in weights.lora.items():
        summary[f"{part}_lora"] = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "modules": {adapter: len(set(modules)) for adapter, modules in lora.target_modules.items()},
            "parameters": sum(tensor.numel() for tensor in lora.state.values()),
        }
        tensors += lora.state.values()
    for attribute in layout.extras:
        state = getattr(weights, attribute)
        summary[attribute.replace("_state", "_parameters")] = sum(tensor.numel() for tensor in state.values())
        tensors += state.values()
    summary["dtypes"] = ", ".join(sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors}))
    summary["metadata"] = dict(weights.metadata)
    return summary
