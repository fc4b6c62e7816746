"""The image-quality metrics of the paper's Table 1, computed through pyiqa.

pyiqa is the optional ``eval`` extra (``pip install 'comfyui-fidesr[eval]'``);
this module imports it only when a :class:`MetricSuite` is built, so the rest of
the project (and ``--help``) works without it.

Conventions, the ones the one-step diffusion SR papers use through pyiqa:

- PSNR and SSIM on the Y channel of BT.601 YCbCr computed from 8-bit RGB
  (``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1]); pyiqa's
  own default Y is YIQ, so ``color_space="ycbcr"`` is passed explicitly.
- LPIPS (AlexNet), DISTS, CLIPIQA, NIQE, MUSIQ (KonIQ), MANIQA (KonIQ) with
  pyiqa's default settings, one image at a time at full size.
- FID between the set of SR images and the set of HQ images (pyiqa's
  clean-FID style Inception features).

Learned metrics fetch their weights on first use (pyiqa's cache lives under
``torch.hub.get_dir()``); PSNR, SSIM never download anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fidesr_core.errors import FiDeSRError, SettingsError

__all__ = [
    "INSTALL_HINT",
    "METRICS",
    "PAPER_METRICS",
    "PAPER_RESULTS",
    "MetricSpec",
    "MetricUnavailableError",
    "MetricSuite",
    "import_metrics_library",
    "parse_metric_names",
]

INSTALL_HINT = "pip install 'comfyui-fidesr[eval]'   (or just: pip install pyiqa)"


class MetricUnavailableError(FiDeSRError):
    """The metrics library is missing, or a metric's weights cannot be loaded."""


@dataclass(frozen=True)
class MetricSpec:
    name: str  # what --metrics accepts, e.g. "psnr"
    label: str  # column title in the paper's Table 1
    higher_is_better: bool
    kind: str  # "full-reference" (SR vs HQ), "no-reference" (SR only) or "set" (SR folder vs HQ folder)
    library_name: str  # pyiqa metric name
    options: tuple[tuple[str, Any], ...] = ()  # extra keyword arguments for pyiqa.create_metric
    needs_weights: bool = False  # pyiqa downloads weights for it on first use
    decimals: int = 4  # as printed in the paper


_Y_CHANNEL = (("test_y_channel", True), ("color_space", "ycbcr"))

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", "PSNR", True, "full-reference", "psnr", _Y_CHANNEL, decimals=2),
        MetricSpec("ssim", "SSIM", True, "full-reference", "ssim", _Y_CHANNEL),
        MetricSpec("lpips", "LPIPS", False, "full-reference", "lpips", needs_weights=True),
        MetricSpec("dists", "DISTS", False, "full-reference", "dists", needs_weights=True),
        MetricSpec("clipiqa", "CLIPIQA", True, "no-reference", "clipiqa", needs_weights=True),
        MetricSpec("niqe", "NIQE", False, "no-reference", "niqe", needs_weights=True),
        MetricSpec("musiq", "MUSIQ", True, "no-reference", "musiq", needs_weights=True, decimals=2),
        MetricSpec("maniqa", "MANIQA", True, "no-reference", "maniqa", needs_weights=True),
        MetricSpec("fid", "FID", False, "set", "fid", needs_weights=True, decimals=2),
    )
}

# Table 1 column order.
PAPER_METRICS: tuple[str, ...] = tuple(METRICS)

# The paper's FiDeSR rows of Table 1 (docs/algorithm.md §7), by dataset key: (dataset title, metric -> value).
PAPER_RESULTS: dict[str, tuple[str, dict[str, float]]] = {
    "realsr": (
        "RealSR",
        dict(zip(PAPER_METRICS, (26.02, 0.7457, 0.2626, 0.1965, 0.6896, 5.3194, 69.82, 0.6681, 109.68), strict=True)),
    ),
    "drealsr": (
        "DRealSR",
        dict(zip(PAPER_METRICS, (28.90, 0.7907, 0.2836, 0.2112, 0.6974, 6.2014, 65.78, 0.6239, 127.97), strict=True)),
    ),
}


def parse_metric_names(names: str | Iterable[str]) -> tuple[str, ...]:
    """``"psnr, SSIM"`` or ``["psnr", "ssim"]`` (``"all"`` for every metric) -> known names in Table 1 order."""
    items = names.split(",") if isinstance(names, str) else list(names)
    wanted = {item.strip().lower() for item in items if item.strip()}
    if "all" in wanted:
        return PAPER_METRICS
    unknown = sorted(wanted - METRICS.keys())
    if unknown:
        raise SettingsError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(PAPER_METRICS)} (or all)")
    if not wanted:
        raise SettingsError(f"no metric chosen; known: {', '.join(PAPER_METRICS)}")
    return tuple(name for name in PAPER_METRICS if name in wanted)


def import_metrics_library() -> types.ModuleType:
    """Import pyiqa, or explain how to install it."""
    try:
        import pyiqa
    except ImportError as error:
        raise MetricUnavailableError(
            f"the metrics need the optional package pyiqa, which cannot be imported ({error}). Install it with: {INSTALL_HINT}"
        ) from error
    return pyiqa


def _provide_pkg_resources_packaging() -> None:
    """Let openai-clip (imported by pyiqa's CLIPIQA) load where setuptools no longer ships pkg_resources.

    clip does ``from pkg_resources import packaging`` and only uses ``packaging.version``;
    setuptools >= 81 removed ``pkg_resources``. Only when it is absent, a stand-in module
    exposing the real ``packaging`` package is registered.
    """
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    try:
        import packaging.version
    except ImportError:
        return
    stand_in = types.ModuleType("pkg_resources", "stand-in: only `packaging`, for openai-clip")
    stand_in.packaging = packaging  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = stand_in


def _scalar(output: Any) -> float:
    """pyiqa returns ``[1]`` or ``[1, 1]`` tensors for one image (a float for FID)."""
    if isinstance(output, torch.Tensor):
        return float(output.detach().reshape(-1)[0].item())
    return float(output)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source.resolve(), target)
    except OSError:  # no symlink rights (Windows without developer mode)
        shutil.copyfile(source, target)


class MetricSuite:
    """The chosen metrics, created once on ``device`` and applied pair by pair."""

    def __init__(
        self,
        names: Sequence[str],
        device: torch.device | str = "cpu",
        announce: Callable[[str], None] = print,
    ) -> None:
        self.specs: tuple[MetricSpec, ...] = tuple(METRICS[name] for name in parse_metric_names(names))
        self.device = torch.device(device)
        library = import_metrics_library()
        self.library_version = f"pyiqa {getattr(library, '__version__', 'unknown version')}"
        self._models: dict[str, Callable[..., Any]] = {}
        for spec in self.specs:
            if spec.needs_weights:
                announce(
                    f"{spec.label}: loading its weights (fetched on first use into the torch hub cache {torch.hub.get_dir()})"
                )
            if spec.name == "clipiqa":
                _provide_pkg_resources_packaging()
            try:
                self._models[spec.name] = library.create_metric(
                    spec.library_name, device=self.device, **dict(spec.options)
                )
            except Exception as error:  # download, hub and import failures all land here
                raise MetricUnavailableError(
                    f"{spec.label}: pyiqa could not create metric {spec.library_name!r}: "
                    f"{type(error).__name__}: {error}"
                    + (
                        " (its weights are downloaded on first use: check the internet connection)"
                        if spec.needs_weights
                        else ""
                    )
                ) from error

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    @property
    def per_image_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs if spec.kind != "set")

    @property
    def set_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs if spec.kind == "set")

    @torch.no_grad()
    def score_pair(self, sr: torch.Tensor, hq: torch.Tensor) -> dict[str, float]:
        """Per-image metrics of one pair; ``sr``, ``hq``: ``[1, 3, H, W]`` in [0, 1], same size."""
        if sr.shape != hq.shape:
            raise SettingsError(f"SR {tuple(sr.shape)} and HQ {tuple(hq.shape)} tensors differ in shape")
        sr = sr.to(self.device, torch.float32)
        hq = hq.to(self.device, torch.float32)
        scores: dict[str, float] = {}
        for spec in self.specs:
            model = self._models[spec.name]
            if spec.kind == "full-reference":
                scores[spec.name] = _scalar(model(sr, hq))
            elif spec.kind == "no-reference":
                scores[spec.name] = _scalar(model(sr))
        return scores

    def score_sets(self, pairs: Sequence[tuple[Path, Path]]) -> dict[str, float]:
        """Set-level metrics (FID) over the SR files against the HQ files of ``pairs`` (whole images)."""
        if not self.set_names or not pairs:
            return {}
        with tempfile.TemporaryDirectory(prefix="fidesr-fid-") as scratch:
            # Folders holding exactly the paired files, so unmatched extras in either folder do not count.
            sr_dir, hq_dir = Path(scratch, "sr"), Path(scratch, "hq")
            sr_dir.mkdir()
            hq_dir.mkdir()
            for index, (sr_path, hq_path) in enumerate(pairs):
                _link_or_copy(Path(sr_path), sr_dir / f"{index:06d}{Path(sr_path).suffix.lower()}")
                _link_or_copy(Path(hq_path), hq_dir / f"{index:06d}{Path(hq_path).suffix.lower()}")
            scores = {}
            for name in self.set_names:
                output = self._models[name](str(sr_dir), str(hq_dir), verbose=False, num_workers=0)
                scores[name] = _scalar(output)
        return scores
