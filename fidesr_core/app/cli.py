"""``python -m fidesr_core``: upscale, convert, info, doctor, download.

Exit codes: 0 success, 1 some images failed or doctor found a problem,
2 bad arguments or unusable model files, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

_EXIT_FAILED, _EXIT_USAGE, _EXIT_INTERRUPTED = 1, 2, 130


def _add_upscale_parser(commands: argparse._SubParsersAction) -> None:
    from ..precision import PRECISIONS
    from ..steps.color_fix import COLOR_FIX_METHODS
    from ..steps.frequency import FILTER_GEOMETRIES
    from ..steps.vae_codec import LATENT_MODES

    parser = commands.add_parser("upscale", help="super-resolve images (files and folders) to PNG")
    parser.add_argument("inputs", nargs="+", type=Path, help="PNG/JPEG/WebP files or folders")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for the PNG results")
    parser.add_argument("--base", required=True, type=Path, help="SD 2.1-base: diffusers folder or single file")
    parser.add_argument("--weights", required=True, type=Path, help="FiDeSR weights: fidesr.pkl or .safetensors")
    parser.add_argument("--upscale-by", type=float, default=4.0, help="scale factor (default 4, as trained)")
    parser.add_argument("--lf-strength", type=float, default=0.1, help="effective LF injection strength (0 = off)")
    parser.add_argument("--hf-strength", type=float, default=0.1, help="effective HF injection strength (0 = off)")
    parser.add_argument("--filter", choices=FILTER_GEOMETRIES, default="official", help="Butterworth geometry")
    parser.add_argument("--color-fix", choices=COLOR_FIX_METHODS, default="adain")
    parser.add_argument("--latent-mode", choices=LATENT_MODES, default="sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent sample")
    parser.add_argument("--tile-size", type=int, default=96, help="U-Net latent tile (0 = never tile)")
    parser.add_argument("--tile-overlap", type=int, default=32)
    parser.add_argument("--encode-tile", type=int, default=1024, help="VAE encoder tile in pixels (0 = off)")
    parser.add_argument("--decode-tile", type=int, default=224, help="VAE decoder tile in latent px (0 = off)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fidesr_core", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show full tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_upscale_parser(commands)
    convert = commands.add_parser("convert", help="convert FiDeSR weights between .pkl and .safetensors")
    convert.add_argument("source", type=Path)
    convert.add_argument("destination", type=Path)
    info = commands.add_parser("info", help="describe a FiDeSR weights file")
    info.add_argument("weights", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")
    doctor = commands.add_parser("doctor", help="check the install; identify model files")
    doctor.add_argument("--base", type=Path, help="a base model to identify")
    doctor.add_argument("--weights", type=Path, help="a FiDeSR weights file to check")
    download = commands.add_parser("download", help="fetch fidesr.pkl and SD 2.1-base from the Hugging Face Hub")
    download.add_argument("--to", type=Path, default=Path("models"), help="destination folder (default ./models)")
    download.add_argument("--skip-base", action="store_true", help="only fetch the FiDeSR weights")
    return parser


def _run_upscale(args: argparse.Namespace) -> int:
    from ..loading.assemble import load_fidesr_model
    from ..pipeline import UpscaleSettings
    from ..steps.injection import HighFrequencySettings, LowFrequencySettings
    from .batch import plan_outputs, upscale_files
    from .image_io import collect_image_files

    settings = UpscaleSettings(
        upscale_by=args.upscale_by,
        latent_mode=args.latent_mode,
        seed=args.seed,
        color_fix=args.color_fix,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        encode_tile_size=args.encode_tile,
        decode_tile_size=args.decode_tile,
        low=LowFrequencySettings(strength=args.lf_strength, filter=args.filter),
        high=HighFrequencySettings(strength=args.hf_strength, filter=args.filter),
    )
    pairs = plan_outputs(collect_image_files(args.inputs, recursive=args.recursive), args.output)
    todo = [pair for pair in pairs if args.overwrite or not pair[1].exists()]
    if not todo:
        print(f"nothing to do: all {len(pairs)} outputs exist in {args.output} (use --overwrite to redo)")
        return 0
    model = load_fidesr_model(args.base, args.weights, precision=args.precision, device=args.device)
    from ..precision import precision_reason

    print(f"FiDeSR on {model.device} in {precision_reason(args.precision, model.device)}: {len(todo)} image(s)")
    result = upscale_files(model, pairs, settings, overwrite=args.overwrite)
    print(f"written {len(result.written)}, skipped {len(result.skipped)} (exist), failed {len(result.failed)}")
    for source, reason in result.failed:
        print(f"  {source}: {reason}", file=sys.stderr)
    return _EXIT_FAILED if result.failed else 0


def _run_convert(args: argparse.Namespace) -> int:
    from ..loading.weights import convert_fidesr_weights

    convert_fidesr_weights(args.source, args.destination)
    print(f"wrote {args.destination}")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from ..loading.weights import describe_fidesr_weights, load_fidesr_weights

    description = describe_fidesr_weights(load_fidesr_weights(args.weights))
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        width = max(len(key) for key in description)
        for key, value in description.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return 0 if run_doctor(base=args.base, weights=args.weights, out=sys.stdout) else _EXIT_FAILED


def _run_download(args: argparse.Namespace) -> int:
    from .download import download_models

    for path in download_models(args.to, include_base=not args.skip_base):
        print(f"ready: {path}")
    return 0


_COMMANDS = {
    "upscale": _run_upscale,
    "convert": _run_convert,
    "info": _run_info,
    "doctor": _run_doctor,
    "download": _run_download,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from ..errors import FiDeSRError

    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted (finished outputs are complete; nothing half-written was kept)", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except (FiDeSRError, OSError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return _EXIT_USAGE
