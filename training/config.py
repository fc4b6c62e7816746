"""Training configuration: typed dataclasses, YAML/TOML files and ``section.key=value`` overrides.

The defaults are the paper's run (docs/algorithm.md §5; ``training/default_config.yaml`` spells
them out): rank-8 LoRA, ``L = 1·L2 + 2·LPIPS + 1·CSD`` with DAW (off for 2000 steps,
1000-step ramp, α 0.6, w_max 2, p 0.5), AdamW 5e-5 / weight decay 1e-2 / clip 1.0 at
a constant rate, fp16, 4 crops of 512² per GPU on 2 GPUs, 200K steps.

A file holds the sections of :class:`TrainConfig` (``model``, ``data``, ``loss``,
``optim``, ``checkpoint``, ``validation``, ``logging``) plus ``output_dir`` and
``seed``; anything not named keeps its default.  Overrides use dotted names,
``optim.learning_rate=1e-4``; values are read as YAML scalars/lists
(``data.hq_folders=[a, b]``, ``model.tokenizer=null``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fidesr_core.errors import SettingsError

__all__ = [
    "MIXED_PRECISIONS",
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "CheckpointConfig",
    "ValidationConfig",
    "LoggingConfig",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "flat_scalars",
    "save_config",
]

MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
CHECKPOINT_FORMATS: tuple[str, ...] = ("pkl", "safetensors")


@dataclass
class ModelConfig:
    base: str = ""  # SD 2.1-base diffusers folder or single file; "tiny" / "tiny:SEED" for tests
    tokenizer: str | None = None  # folder with CLIP vocab.json + merges.txt (default: BASE/tokenizer)
    csd_model: str | None = None  # another SD 2.x model for CSD; None = the base U-Net with the LoRA off
    init_weights: str | None = None  # FiDeSR .pkl / .safetensors to fine-tune from
    lora_rank: int = 8
    latent_sampling: str = "sample"  # z_L from the VAE posterior: "sample" (as released) or "mode"


@dataclass
class DataConfig:
    hq_folders: list[str] = field(default_factory=list)  # searched recursively for images
    hq_lists: list[str] = field(default_factory=list)  # text files, one image path a line
    captions: str | None = None  # .jsonl / .csv mapping image -> caption
    sidecar_captions: bool = True  # IMAGE.txt next to IMAGE.png is its caption
    caption_suffix: str = ", "  # the released trainer prompts "{tags}, {pos_prompt}" with pos_prompt ""
    caption_dropout: float = 0.5  # probability that a batch trains with the empty prompt
    crop_size: int = 512
    flip: bool = True
    num_workers: int = 4
    degradation: dict[str, Any] = field(default_factory=dict)  # DegradationConfig overrides


@dataclass
class LossConfig:
    lambda_l2: float = 1.0
    lambda_lpips: float = 2.0
    lambda_csd: float = 1.0
    daw_start: int = 2000
    daw_ramp: int = 1000
    daw_alpha: float = 0.6
    daw_w_max: float = 2.0
    daw_perceptual_mix: float = 0.5
    csd_guidance: float = 7.5
    csd_min_timestep: int = 20
    csd_max_timestep: int = 500
    lpips_pretrained: bool = True  # ImageNet VGG trunk through torchvision (cached after one download)
    lpips_trunk_weights: str | None = None  # local torchvision vgg16 state dict instead


@dataclass
class OptimConfig:
    learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 4  # per process
    gradient_accumulation: int = 1
    max_steps: int = 200_000
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    cast_frozen_weights: bool = True  # frozen VAE / text encoder / base U-Net in the mixed-precision dtype
    allow_tf32: bool = True


@dataclass
class CheckpointConfig:
    every: int = 5000
    keep_last: int = 3  # 0 keeps every checkpoint
    formats: list[str] = field(default_factory=lambda: list(CHECKPOINT_FORMATS))


@dataclass
class ValidationConfig:
    lq_folder: str | None = None
    hq_folder: str | None = None  # same file stems as the LQ images: PSNR / LPIPS are computed
    every: int = 5000
    max_images: int = 0  # 0 = all
    color_fix: str = "adain"
    latent_mode: str = "mode"


@dataclass
class LoggingConfig:
    every: int = 10  # steps between tracker / log lines
    tensorboard: bool = True  # when installed
    progress_bar: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "runs/fidesr"
    seed: int = 123
    resume: str | None = None  # "latest" or a checkpoint folder
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        validate_config(self)


# --------------------------------------------------------------------------- validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(f"training config: {message}")


def validate_config(config: TrainConfig) -> None:
    """Raise ``SettingsError`` naming the first value out of range."""
    model, data, loss, optim = config.model, config.data, config.loss, config.optim
    _require(model.lora_rank >= 1, f"model.lora_rank must be >= 1, got {model.lora_rank}")
    _require(
        model.latent_sampling in ("sample", "mode"),
        f"model.latent_sampling must be sample or mode, got {model.latent_sampling!r}",
    )
    _require(0.0 <= data.caption_dropout <= 1.0, f"data.caption_dropout must lie in [0, 1], got {data.caption_dropout}")
    _require(
        data.crop_size >= 16 and data.crop_size % 8 == 0,
        f"data.crop_size must be a multiple of 8, >= 16, got {data.crop_size}",
    )
    _require(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
    for name in ("lambda_l2", "lambda_lpips", "lambda_csd"):
        _require(getattr(loss, name) >= 0, f"loss.{name} must be >= 0, got {getattr(loss, name)}")
    _require(loss.daw_start >= 0 and loss.daw_ramp >= 0, "loss.daw_start and loss.daw_ramp must be >= 0")
    _require(0 <= loss.csd_min_timestep < loss.csd_max_timestep, "loss.csd_min_timestep must be < csd_max_timestep")
    _require(optim.learning_rate > 0, f"optim.learning_rate must be > 0, got {optim.learning_rate}")
    _require(optim.batch_size >= 1, f"optim.batch_size must be >= 1, got {optim.batch_size}")
    _require(
        optim.gradient_accumulation >= 1, f"optim.gradient_accumulation must be >= 1, got {optim.gradient_accumulation}"
    )
    _require(optim.max_steps >= 0, f"optim.max_steps must be >= 0, got {optim.max_steps}")
    _require(optim.max_grad_norm > 0, f"optim.max_grad_norm must be > 0, got {optim.max_grad_norm}")
    _require(
        optim.mixed_precision in MIXED_PRECISIONS,
        f"optim.mixed_precision must be one of {MIXED_PRECISIONS}, got {optim.mixed_precision!r}",
    )
    _require(config.checkpoint.every >= 1, f"checkpoint.every must be >= 1, got {config.checkpoint.every}")
    _require(config.checkpoint.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {config.checkpoint.keep_last}")
    unknown = [name for name in config.checkpoint.formats if name not in CHECKPOINT_FORMATS]
    _require(not unknown, f"checkpoint.formats must be among {CHECKPOINT_FORMATS}, got {config.checkpoint.formats}")
    _require(config.validation.every >= 1, f"validation.every must be >= 1, got {config.validation.every}")
    _require(config.validation.max_images >= 0, "validation.max_images must be >= 0")
    _require(config.logging.every >= 1, f"logging.every must be >= 1, got {config.logging.every}")


# --------------------------------------------------------------------------- typed conversion


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` converted to the field type ``annotation`` (a string annotation is resolved first)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except SettingsError as error:
                errors.append(str(error))
        raise SettingsError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"training config: {name} must be a list, got {value!r}")
        return [_coerce(item, item_type, f"{name}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SettingsError(f"training config: {name} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise SettingsError(f"training config: {name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise SettingsError(f"training config: {name} must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError as error:
            raise SettingsError(f"training config: {name} must be an integer, got {value!r}") from error
        if not number.is_integer():
            raise SettingsError(f"training config: {name} must be an integer, got {value!r}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise SettingsError(f"training config: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise SettingsError(f"training config: {name} must be a number, got {value!r}") from error
    if annotation is str:
        if isinstance(value, (str, Path, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SettingsError(f"training config: {name} must be a string, got {value!r}")
    raise SettingsError(f"training config: {name} has an unsupported type {annotation!r}")


def _unknown_key(key: str, known: Iterable[str], where: str) -> SettingsError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SettingsError(f"training config: unknown key {where}{key!r}{hint}; known: {', '.join(sorted(known))}")


def _section_from_dict(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(key, names, where)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise SettingsError(f"training config: {where}{key} must be a section (mapping), got {value!r}")
            kwargs[key] = _section_from_dict(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}{key}")
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested mappings (missing keys keep their defaults)."""
    return _section_from_dict(TrainConfig, values, "")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Nested plain dict (YAML/JSON-serialisable) of ``config``."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- files and overrides


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"training config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise SettingsError(f"training config file {path}: expected .yaml, .yml, .json or .toml")
    except SettingsError:
        raise
    except Exception as error:  # the parsers' own exception types differ
        raise SettingsError(f"training config file {path} cannot be parsed: {error}") from error
    if not isinstance(values, dict):
        raise SettingsError(f"training config file {path} must hold a mapping at the top, got {type(values).__name__}")
    return values


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target = values
    for part in parts[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError(f"training config: override {dotted!r}: {part!r} is not a section")
        target = child
    target[parts[-1]] = value


def apply_overrides(values: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to the nested dict ``values`` (in place) and return it."""
    import yaml

    for item in overrides:
        key, separator, raw = item.partition("=")
        if not separator or not key.strip():
            raise SettingsError(f"training config: override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(values, key.strip(), value)
    return values


def load_config(
    path: str | os.PathLike | None = None, overrides: Iterable[str] = (), extra: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the file at ``path`` (YAML/TOML/JSON), then ``extra`` (nested), then ``overrides``."""
    values: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    for dotted, value in (extra or {}).items():
        _set_dotted(values, dotted, value)
    apply_overrides(values, overrides)
    return config_from_dict(values)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (what a run used; loadable with :func:`load_config`)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def flat_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted names -> scalars (TensorBoard hparams take no lists or None: those become strings)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
