"""Score a folder of SR results against its HQ ground truth with the paper's Table 1 metrics.

    python -m training.evaluate --sr results/realsr --hq data/RealSR/test_HR --reference realsr

Pairing rule (extensions never matter): every image gets a key, its file stem minus
``--sr-suffix`` / ``--hq-suffix`` when the stem ends with it. An SR image pairs with the
HQ image whose key equals its key; failing that, with the HQ image whose key is the
longest prefix of the SR key that is followed by ``_``, ``-`` or ``.`` (so
``0001_x4.png`` and ``0001-fidesr.jpg`` pair with ``0001.png``). Two SR images for one HQ
image, or two images with one key in a folder, are errors; images without a partner are
reported and left out (``--strict`` makes them an error). Only the top level of each
folder is read; hidden files are skipped.

Output: the table in the layout of the paper's Table 1 on stdout, and ``PREFIX.csv``
(one row per pair, then the means) and ``PREFIX.json`` (means, per-image values,
settings, unmatched files), both written atomically. Non-finite values (PSNR of
identical images computed without an epsilon) are ``inf`` in the CSV and ``null`` in
the JSON. ``--crop-border N`` removes N pixels from every side of both images before
the per-image metrics; FID always reads the whole files.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fidesr_core.app.image_io import DATASET_IMAGE_EXTENSIONS, image_files_in, load_image
from fidesr_core.atomic_write import write_atomic
from fidesr_core.errors import FiDeSRError, ImageInputError, SettingsError

from .metrics import METRICS, PAPER_METRICS, PAPER_RESULTS, MetricSuite, parse_metric_names

__all__ = [
    "ImagePair",
    "Pairing",
    "EvaluationResult",
    "list_images",
    "pair_images",
    "evaluate_folders",
    "format_table",
    "write_csv",
    "write_json",
    "main",
]

_KEY_SEPARATORS = "_-."
_EXIT_USAGE, _EXIT_INTERRUPTED = 2, 130


@dataclass(frozen=True)
class ImagePair:
    key: str  # the HQ key, used as the image's name in the outputs
    sr: Path
    hq: Path


@dataclass(frozen=True)
class Pairing:
    pairs: tuple[ImagePair, ...]
    unmatched_sr: tuple[Path, ...]
    unmatched_hq: tuple[Path, ...]


@dataclass
class EvaluationResult:
    name: str
    sr_dir: Path
    hq_dir: Path
    metrics: tuple[str, ...]  # in Table 1 order
    per_image: list[dict[str, float]]  # one dict per pair, per-image metrics only
    means: dict[str, float]  # per-image means plus the set-level metrics (FID)
    pairing: Pairing
    settings: dict[str, object] = field(default_factory=dict)


def list_images(folder: str | Path, role: str) -> list[Path]:
    """Image files directly inside ``folder`` (sorted); ``role`` ("SR"/"HQ") names it in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"{role} folder {folder} does not exist or is not a folder")
    images = image_files_in(folder, extensions=DATASET_IMAGE_EXTENSIONS)
    if not images:
        kinds = ", ".join(sorted(DATASET_IMAGE_EXTENSIONS))
        raise ImageInputError(f"{role} folder {folder} holds no images ({kinds})")
    return images


def _key(stem: str, suffix: str) -> str:
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) and stem != suffix else stem


def _matching_hq_key(sr_key: str, hq_keys: dict[str, Path]) -> str | None:
    if sr_key in hq_keys:
        return sr_key
    for end in range(len(sr_key) - 1, 0, -1):  # longest prefix first
        if sr_key[end] in _KEY_SEPARATORS and sr_key[:end] in hq_keys:
            return sr_key[:end]
    return None


def _keyed(paths: list[Path], suffix: str, role: str) -> dict[str, Path]:
    keyed: dict[str, Path] = {}
    for path in paths:
        key = _key(path.stem, suffix)
        if key in keyed:
            raise ImageInputError(
                f"{role} folder has two images for {key!r}: {keyed[key].name} and {path.name}; keep one"
            )
        keyed[key] = path
    return keyed


def pair_images(sr_dir: str | Path, hq_dir: str | Path, *, sr_suffix: str = "", hq_suffix: str = "") -> Pairing:
    """Pair SR and HQ images by key (see the module docstring for the rule)."""
    hq_by_key = _keyed(list_images(hq_dir, "HQ"), hq_suffix, "HQ")
    sr_by_key = _keyed(list_images(sr_dir, "SR"), sr_suffix, "SR")
    sr_for_hq: dict[str, Path] = {}
    unmatched_sr: list[Path] = []
    for sr_key, sr_path in sr_by_key.items():
        hq_key = _matching_hq_key(sr_key, hq_by_key)
        if hq_key is None:
            unmatched_sr.append(sr_path)
        elif hq_key in sr_for_hq:
            raise ImageInputError(
                f"SR images {sr_for_hq[hq_key].name} and {sr_path.name} both pair with HQ image "
                f"{hq_by_key[hq_key].name}; keep one (or set --sr-suffix)"
            )
        else:
            sr_for_hq[hq_key] = sr_path
    pairs = tuple(ImagePair(key, sr_for_hq[key], hq_by_key[key]) for key in sorted(sr_for_hq))
    unmatched_hq = tuple(path for key, path in sorted(hq_by_key.items()) if key not in sr_for_hq)
    return Pairing(pairs, tuple(sorted(unmatched_sr)), unmatched_hq)


def _load_rgb(path: Path) -> torch.Tensor:
    return load_image(path).rgb  # [1, 3, H, W] in [0, 1]; alpha is not scored


def _crop(image: torch.Tensor, border: int) -> torch.Tensor:
    return image[..., border:-border, border:-border] if border > 0 else image


def _size(image: torch.Tensor) -> str:
    return f"{image.shape[-1]}x{image.shape[-2]}"


def _score_pair(suite: MetricSuite, pair: ImagePair, crop_border: int) -> dict[str, float]:
    sr, hq = _load_rgb(pair.sr), _load_rgb(pair.hq)
    if sr.shape != hq.shape:
        raise ImageInputError(
            f"size mismatch: SR {pair.sr} is {_size(sr)} but HQ {pair.hq} is {_size(hq)} (width x height); "
            "SR and HQ images must have the same size"
        )
    if min(sr.shape[-2:]) <= 2 * crop_border:
        raise SettingsError(f"--crop-border {crop_border} leaves nothing of {pair.sr} ({_size(sr)})")
    return suite.score_pair(_crop(sr, crop_border), _crop(hq, crop_border))


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise SettingsError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    from fidesr_core.precision import resolve_device

    return resolve_device(name)


def evaluate_folders(
    sr_dir: str | Path,
    hq_dir: str | Path,
    *,
    metrics: str | Sequence[str] = PAPER_METRICS,
    device: str = "auto",
    crop_border: int = 0,
    name: str | None = None,
    sr_suffix: str = "",
    hq_suffix: str = "",
    strict: bool = False,
    show_progress: bool = True,
    announce: Callable[[str], None] = print,
) -> EvaluationResult:
    """Pair the folders, score every pair, average, then compute the set-level metrics."""
    names = parse_metric_names(metrics)
    if crop_border < 0:
        raise SettingsError(f"--crop-border must be 0 or more, got {crop_border}")
    pairing = pair_images(sr_dir, hq_dir, sr_suffix=sr_suffix, hq_suffix=hq_suffix)
    for role, unmatched in (("SR", pairing.unmatched_sr), ("HQ", pairing.unmatched_hq)):
        if unmatched:
            listed = ", ".join(path.name for path in unmatched[:10]) + (", ..." if len(unmatched) > 10 else "")
            message = f"{len(unmatched)} {role} image(s) have no partner: {listed}"
            if strict:
                raise ImageInputError(message + " (--strict)")
            announce(f"warning: {message}; they are left out")
    if not pairing.pairs:
        raise ImageInputError(
            f"no SR image in {sr_dir} pairs with an HQ image in {hq_dir} (see --sr-suffix/--hq-suffix)"
        )
    torch_device = _pick_device(device)
    suite = MetricSuite(names, torch_device, announce=announce)
    per_image = [
        _score_pair(suite, pair, crop_border)
        for pair in tqdm(pairing.pairs, desc="scoring", unit="img", disable=not show_progress, dynamic_ncols=True)
    ]
    means = {metric: _mean([scores[metric] for scores in per_image]) for metric in suite.per_image_names}
    if suite.set_names:
        announce(f"computing {', '.join(METRICS[n].label for n in suite.set_names)} over {len(pairing.pairs)} pairs")
        means.update(suite.score_sets([(pair.sr, pair.hq) for pair in pairing.pairs]))
    settings: dict[str, object] = {
        "device": str(torch_device),
        "crop_border": crop_border,
        "library": suite.library_version,
        "y_channel": "BT.601 YCbCr Y of 8-bit RGB (PSNR, SSIM)",
        "sr_suffix": sr_suffix,
        "hq_suffix": hq_suffix,
        "pairs": len(pairing.pairs),
    }
    return EvaluationResult(
        name=name or Path(sr_dir).resolve().name,
        sr_dir=Path(sr_dir),
        hq_dir=Path(hq_dir),
        metrics=names,
        per_image=per_image,
        means=means,
        pairing=pairing,
        settings=settings,
    )


def _arrows_supported(stream: object) -> bool:
    try:
        "↑↓".encode(getattr(stream, "encoding", None) or "ascii")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


def _cell(value: float | None, decimals: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{decimals}f}"


def format_table(result: EvaluationResult, reference: str | None = None, arrows: bool = True) -> str:
    """Text table with the columns of the paper's Table 1; ``reference`` adds the paper's FiDeSR row."""
    up, down = ("↑", "↓") if arrows else ("(+)", "(-)")
    headers = [METRICS[name].label + (up if METRICS[name].higher_is_better else down) for name in PAPER_METRICS]
    rows: list[tuple[str, dict[str, float]]] = []
    corner = "Method"
    if reference is not None:
        if reference not in PAPER_RESULTS:
            raise SettingsError(f"--reference {reference!r}: known are {', '.join(PAPER_RESULTS)}")
        corner, paper_values = PAPER_RESULTS[reference]
        rows.append(("FiDeSR (paper)", paper_values))
    rows.append((result.name, result.means))
    first_width = max(len(corner), *(len(label) for label, _ in rows))
    widths = [max(len(header), 7) for header in headers]
    lines = [corner.ljust(first_width) + "".join("  " + h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    for label, values in rows:
        cells = [_cell(values.get(name), METRICS[name].decimals) for name in PAPER_METRICS]
        lines.append(label.ljust(first_width) + "".join("  " + c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))  # repr round-trips; inf/nan print as inf/nan


def write_csv(result: EvaluationResult, path: str | Path) -> None:
    """One row per pair (image, files, metrics), then a ``mean`` row that also carries FID."""
    header = ["image", "sr_file", "hq_file", *result.metrics]

    def write(temp: str) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for pair, scores in zip(result.pairing.pairs, result.per_image, strict=True):
                writer.writerow(
                    [pair.key, pair.sr.name, pair.hq.name, *(_csv_number(scores.get(m)) for m in result.metrics)]
                )
            writer.writerow(["mean", "", "", *(_csv_number(result.means.get(m)) for m in result.metrics)])

    write_atomic(path, write)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_json(result: EvaluationResult, path: str | Path, reference: str | None = None) -> None:
    """Means, per-image values, settings, unmatched files and (optionally) the paper's row."""
    document: dict[str, object] = {
        "name": result.name,
        "sr_dir": str(result.sr_dir),
        "hq_dir": str(result.hq_dir),
        "metrics": list(result.metrics),
        "mean": {metric: _json_number(result.means[metric]) for metric in result.metrics},
        "per_image": [
            {"image": pair.key, "sr_file": pair.sr.name, "hq_file": pair.hq.name}
            | {metric: _json_number(value) for metric, value in scores.items()}
            for pair, scores in zip(result.pairing.pairs, result.per_image, strict=True)
        ],
        "unmatched": {
            "sr": [path.name for path in result.pairing.unmatched_sr],
            "hq": [path.name for path in result.pairing.unmatched_hq],
        },
        "settings": result.settings,
    }
    if reference is not None:
        dataset, values = PAPER_RESULTS[reference]
        document["reference"] = {"dataset": dataset, "method": "FiDeSR (paper, Table 1)", "values": values}
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Score SR images against HQ ground truth with the metrics of the FiDeSR paper's Table 1 "
        "(needs pyiqa: pip install 'comfyui-fidesr[eval]').",
    )
    parser.add_argument("--sr", required=True, type=Path, help="folder of super-resolved images")
    parser.add_argument("--hq", required=True, type=Path, help="folder of ground-truth images")
    parser.add_argument(
        "--metrics", default=",".join(PAPER_METRICS), help=f"comma-separated subset of {','.join(PAPER_METRICS)} or all"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels removed from each side before scoring")
    parser.add_argument("--name", help="row label in the table (default: the SR folder's name)")
    parser.add_argument(
        "--reference", choices=sorted(PAPER_RESULTS), help="add the paper's FiDeSR row for this dataset"
    )
    parser.add_argument(
        "--out", type=Path, help="output prefix for PREFIX.csv and PREFIX.json (default: <SR folder>_metrics)"
    )
    parser.add_argument("--sr-suffix", default="", help="stem ending ignored on SR files, e.g. _x4")
    parser.add_argument("--hq-suffix", default="", help="stem ending ignored on HQ files, e.g. _HR")
    parser.add_argument("--strict", action="store_true", help="fail when an image has no partner")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate_folders(
            args.sr,
            args.hq,
            metrics=args.metrics,
            device=args.device,
            crop_border=args.crop_border,
            name=args.name,
            sr_suffix=args.sr_suffix,
            hq_suffix=args.hq_suffix,
            strict=args.strict,
            show_progress=not args.no_progress,
            announce=lambda line: print(line, file=sys.stderr),
        )
        prefix = args.out or args.sr.parent / f"{args.sr.resolve().name}_metrics"
        csv_path, json_path = Path(f"{prefix}.csv"), Path(f"{prefix}.json")
        write_csv(result, csv_path)
        write_json(result, json_path, args.reference)
    except KeyboardInterrupt:
        print("interrupted (no half-written output files were left)", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except (FiDeSRError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return _EXIT_USAGE
    print(format_table(result, args.reference, arrows=_arrows_supported(sys.stdout)))
    print(f"{len(result.pairing.pairs)} pairs; {result.settings['library']}; wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
