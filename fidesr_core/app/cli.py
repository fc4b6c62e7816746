"""fidesr (or python -m fidesr_core): upscale, convert, info, doctor, download.

Exit codes: 0 success, 1 some images failed or doctor found a problem,
2 bad arguments or unusable model files, 3 download could not fetch a file, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

_EXIT_FAILED, _EXIT_USAGE, _EXIT_NOT_FETCHED, _EXIT_INTERRUPTED = 1, 2, 3, 130
_PIL_DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as shipped (1024**3 // 4 // 3)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2 (subcommand parsers are made of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(_EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default that is a value (not for required arguments and switches)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = not (action.default is None or action.default is False or action.default == "")
        return super()._get_help_string(action) if shown else action.help


def _verbose_flag() -> argparse.ArgumentParser:
    """``-v`` accepted after the subcommand too; SUPPRESS keeps the main parser's value when absent."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks and debug logs"
    )
    return parent


def _setting_flag(parser: argparse.ArgumentParser, flag: str, setting: str, help_text: str, **extra) -> None:
    """A flag for ``setting`` (a field of UpscaleSettings, or "lf."/"hf." + a field of the branch settings):
    its default, type and choices come from the settings' own rule, so argparse names the flag on a bad value."""
    from ..settings import HighFrequencySettings, LowFrequencySettings, UpscaleSettings, rule_of

    owner, _, name = setting.rpartition(".")
    settings_type = {"": UpscaleSettings, "lf": LowFrequencySettings, "hf": HighFrequencySettings}[owner]
    rule, default = rule_of(settings_type, name), getattr(settings_type(), name)

    def parse(text: str) -> object:
        from ..errors import SettingsError

        try:
            return rule.parse(setting, text)
        except SettingsError as error:
            raise argparse.ArgumentTypeError(error.problem) from None

    if rule.choices:
        options = {"choices": rule.choices}
    else:
        options = {"type": parse, "metavar": extra.pop("metavar", flag.removeprefix("--").upper().replace("-", "_"))}
    parser.add_argument(flag, dest=setting, default=default, help=help_text, **options, **extra)


def _add_upscale_parser(commands: argparse._SubParsersAction, common: list[argparse.ArgumentParser]) -> None:
    from ..precision import PRECISIONS
    from .upscale_command import SETTING_FLAGS

    summary = "super-resolve images (files and folders) to PNG"
    parser = commands.add_parser("upscale", parents=common, help=summary, formatter_class=_HelpWithDefaults)
    parser.add_argument("inputs", nargs="+", type=Path, help="PNG/JPEG/WebP files or folders")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for the PNG results")
    parser.add_argument("--base", required=True, type=Path, help="SD 2.1-base: diffusers folder or single file")
    parser.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="FiDeSR, PiSA-SR or OSEDiff weights (fidesr.pkl, pisa_sr.pkl, osediff.pkl or .safetensors; told by content)",
    )
    for flag, setting, help_text in SETTING_FLAGS:
        _setting_flag(parser, flag, setting, help_text, **({"metavar": "MB"} if flag == "--vae-memory" else {}))
    parser.add_argument("--prompt", default="", help="text prompt (OSEDiff encodes ', PROMPT,' as released)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="compute precision of U-Net and VAE")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=_PIL_DEFAULT_MAX_IMAGE_PIXELS,
        help="refuse images that declare more pixels (decompression-bomb guard; 0 = no limit)",
    )
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders (mirrored under -o)")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose output is complete")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from .. import __version__

    summary, _, exit_codes = __doc__.partition("\n\n")
    parser = _Parser(prog=prog, description=summary, epilog=" ".join(exit_codes.split()))
    parser.add_argument("-v", "--verbose", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = [_verbose_flag()]
    _add_upscale_parser(commands, common)
    convert = commands.add_parser(
        "convert", parents=common, help="convert FiDeSR, PiSA-SR or OSEDiff weights between .pkl and .safetensors"
    )
    convert.add_argument("source", type=Path)
    convert.add_argument("destination", type=Path)
    convert.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    info = commands.add_parser("info", parents=common, help="describe a FiDeSR, PiSA-SR or OSEDiff weights file")
    info.add_argument("weights", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")
    doctor = commands.add_parser("doctor", parents=common, help="check the install; identify model files")
    doctor.add_argument("--base", type=Path, help="a base model to identify")
    doctor.add_argument("--weights", type=Path, help="a FiDeSR, PiSA-SR or OSEDiff weights file to check")
    download = commands.add_parser(
        "download", parents=common, help="fetch fidesr.pkl and SD 2.1-base from the Hugging Face Hub"
    )
    download.add_argument("--to", type=Path, default=Path("models"), help="destination folder (default ./models)")
    download.add_argument("--skip-base", action="store_true", help="only fetch the FiDeSR weights")
    download.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="REPO_ID",
        help="another Hub repository holding the same files, tried after the known ones (repeatable)",
    )
    return parser


def _run_upscale(args: argparse.Namespace) -> int:
    from .upscale_command import run

    return run(args)


def _run_convert(args: argparse.Namespace) -> int:
    from ..errors import SettingsError
    from ..loading.weights import convert_restorer_weights

    if args.destination.exists() and not args.overwrite:
        raise SettingsError(f"{args.destination} exists; add --overwrite to replace it")
    convert_restorer_weights(args.source, args.destination)
    print(f"wrote {args.destination}")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from ..loading.weights import describe_restorer_weights, load_restorer_weights

    description = describe_restorer_weights(load_restorer_weights(args.weights))
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


class _ByteBar:
    """A terminal progress bar per transfer (none when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar = None
        self.done = 0

    def __call__(self, done: int, total: int | None) -> None:
        from tqdm import tqdm

        if self.bar is None or done < self.done or total != self.bar.total:
            self.close()
            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, disable=None, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def print(self, line: str) -> None:
        self.close()
        print(line, flush=True)


def _run_download(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import logging as hub_logging

    from ..errors import SettingsError
    from .download import DownloadError, download_models, is_repo_id

    for repo_id in args.source:
        if not is_repo_id(repo_id):
            raise SettingsError(f"argument --source: {repo_id!r} is not a Hub repository id (owner/name)")
    hub_logging.disable_propagation()  # it has its own handler: through ours too, every line came twice
    bar = _ByteBar()
    try:
        paths = download_models(
            args.to, include_base=not args.skip_base, extra_sources=args.source, progress=bar, report=bar.print
        )
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        for line in error.by_hand:
            print(line, file=sys.stderr)
        return _EXIT_NOT_FETCHED
    for path in paths:
        print(f"ready: {path}")
    return 0


_COMMANDS = {
    "upscale": _run_upscale,
    "convert": _run_convert,
    "info": _run_info,
    "doctor": _run_doctor,
    "download": _run_download,
}


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command line; ``prog`` is the name in messages (default: how the program was started)."""
    args = build_parser(prog).parse_args(argv)
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
