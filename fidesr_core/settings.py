"""Every setting of an upscale, each checked once, here (docs/algorithm.md §2, §4).

A field's ``Rule`` (in its metadata) says what it accepts, for the dataclasses and the CLI alike.  A bad
value raises ``SettingsError`` naming the field (``"lf.cutoff"``), so each front end can name its own flag
or input.  Defaults reproduce the released test scripts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from .errors import SettingsError
from .tiled_vae.budget import MemoryBudget

if TYPE_CHECKING:
    import torch

ColorFixMethod = Literal["adain", "wavelet", "none"]
COLOR_FIX_METHODS: tuple[str, ...] = ("adain", "wavelet", "none")
FilterGeometry = Literal["official", "radial"]
FILTER_GEOMETRIES: tuple[str, ...] = ("official", "radial")
LatentMode = Literal["sample", "mode"]
LATENT_MODES: tuple[str, ...] = ("sample", "mode")
PROCESS_SIZE = 512  # SD 2.1-base resolution; the released script's process_size


@dataclass(frozen=True)
class Rule:
    """What one setting accepts: a ``kind`` (int, float or str) within ``[low, high]`` (``above``: > low),
    one of ``choices``, ``off`` (a value that switches the feature off, outside the range), or None if ``optional``."""

    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    off: int | None = None
    above: bool = False
    optional: bool = False

    def wanted(self) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            what += f" from {self.low:g} to {self.high:g}"
        elif self.low is not None:
            what += f" {'>' if self.above else '>='} {self.low:g}"
        return what if self.off is None else f"{self.off} (off) or {what}"

    def check(self, name: str, value: object) -> None:
        if value is None and self.optional:
            return
        if self.choices:
            ok = value in self.choices
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and not self.choices and value != self.off:
            ok = (self.low is None or value > self.low or (value == self.low and not self.above)) and (
                self.high is None or value <= self.high
            )
        if not ok:
            raise SettingsError(f"must be {self.wanted()}, got {value!r}", setting=name)

    def parse(self, name: str, text: str) -> Any:
        """``text`` (a command-line value) as a checked value of this setting."""
        try:
            value = text if self.choices else self.kind(text)
        except ValueError:
            raise SettingsError(f"must be {self.wanted()}, got {text!r}", setting=name) from None
        self.check(name, value)
        return value


def _setting(default: Any, rule: Rule) -> Any:
    return field(default=default, metadata={"rule": rule})


def rule_of(settings_type: type, name: str) -> Rule:
    """The ``Rule`` of field ``name`` of a settings dataclass."""
    return next(item for item in fields(settings_type) if item.name == name).metadata["rule"]


def _check_fields(settings: object, prefix: str = "") -> None:
    for item in fields(settings):
        rule = item.metadata.get("rule")
        if rule is not None:
            rule.check(prefix + item.name, getattr(settings, item.name))


_ANY = Rule(float)
_ORDER = Rule(int, 1, 16)
_CUTOFF = Rule(float, 0.0, 1.0, above=True)
_GAMMA = Rule(float, 0.0, above=True)
_FILTER = Rule(str, choices=FILTER_GEOMETRIES)


@dataclass(frozen=True)
class LowFrequencySettings:
    """LF branch; defaults are the released test code's, strength is effective (docs/algorithm.md §4)."""

    strength: float = _setting(0.1, _ANY)
    cutoff: float = _setting(0.10, _CUTOFF)
    order: int = _setting(2, _ORDER)
    channel_tau: float = _setting(0.8, _ANY)
    channel_sharpness: float = _setting(10.0, _ANY)
    gamma: float = _setting(1.2, _GAMMA)
    filter: FilterGeometry = _setting("official", _FILTER)

    def __post_init__(self) -> None:
        _check_fields(self, "lf.")


@dataclass(frozen=True)
class HighFrequencySettings:
    """HF branch; its channel gate uses the LF branch's settings in the released code."""

    strength: float = _setting(0.1, _ANY)
    cutoff: float = _setting(0.32, _CUTOFF)
    order: int = _setting(2, _ORDER)
    gamma: float = _setting(1.2, _GAMMA)
    channel_cutoff: float = _setting(0.10, _CUTOFF)
    channel_order: int = _setting(2, _ORDER)
    channel_tau: float = _setting(0.8, _ANY)
    channel_sharpness: float = _setting(10.0, _ANY)
    filter: FilterGeometry = _setting("official", _FILTER)

    def __post_init__(self) -> None:
        _check_fields(self, "hf.")


_STRENGTH = Rule(float, -10.0, 10.0, optional=True)  # None: PiSA-SR's default mode


@dataclass(frozen=True)
class UpscaleSettings:
    """Every knob of one upscale.  ``pixel_strength`` / ``semantic_strength``: PiSA-SR's ``λ_pix``, ``λ_sem``
    (both None: its default mode; the other families ignore them).  Tile sizes of 0 never tile."""

    upscale_by: float = _setting(4.0, Rule(float, 1.0, 16.0))
    latent_mode: LatentMode = _setting("sample", Rule(str, choices=LATENT_MODES))
    seed: int = _setting(0, Rule(int, 0, 2**64 - 1))  # what torch.Generator.manual_seed takes (and ComfyUI gives)
    color_fix: ColorFixMethod = _setting("adain", Rule(str, choices=COLOR_FIX_METHODS))
    tile_size: int = _setting(96, Rule(int, 1, off=0))  # U-Net tile, latent px
    tile_overlap: int = _setting(32, Rule(int, 0))  # latent px, below tile_size
    encode_tile_size: int = _setting(1024, Rule(int, 8, off=0))  # VAE encoder tile, image px
    decode_tile_size: int = _setting(224, Rule(int, 1, off=0))  # VAE decoder tile, latent px
    process_size: int = _setting(PROCESS_SIZE, Rule(int, 8, 8192))  # short side the upscaled image is brought up to
    lf: LowFrequencySettings = field(default_factory=LowFrequencySettings)
    hf: HighFrequencySettings = field(default_factory=HighFrequencySettings)
    pixel_strength: float | None = _setting(None, _STRENGTH)
    semantic_strength: float | None = _setting(None, _STRENGTH)
    # most MiB of RAM for the tiled VAE's whole-image maps (None: what is free); the rest wait in files (TMPDIR)
    vae_memory_mb: int | None = _setting(None, Rule(int, 0, 1 << 30, optional=True))

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise SettingsError(
                f"must be smaller than tile_size ({self.tile_size}), got {self.tile_overlap}",
                setting="tile_overlap",
            )
        for name, kind in (("lf", LowFrequencySettings), ("hf", HighFrequencySettings)):
            if not isinstance(getattr(self, name), kind):
                raise SettingsError(f"must be {kind.__name__}", setting=name)

    def vae_budget(self, free_memory: Callable[[torch.device], int | None]) -> MemoryBudget:
        """The tiled VAE's memory budget these settings ask for; ``free_memory`` tells a device's free bytes."""
        cap = None if self.vae_memory_mb is None else self.vae_memory_mb << 20
        return MemoryBudget(map_bytes=cap, free_memory=free_memory)
