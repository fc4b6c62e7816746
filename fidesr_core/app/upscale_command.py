"""The ``upscale`` command: every argument checked before the model loads, the batch, one summary.  Under
``torchrun`` / ``accelerate launch`` rank 0 plans, every rank upscales its block, rank 0 sums up."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..errors import FiDeSRError, ImageInputError, SettingsError
from ..settings import UpscaleSettings
from .batch import BatchResult, pending, plan_outputs, upscale_files
from .ranks import joined_ranks, rank_device

if TYPE_CHECKING:
    from accelerate import PartialState

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# (flag, the setting it sets, help): the parser takes each flag's default, type and choices from the setting.
SETTING_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--pixel-strength", "pixel_strength", "PiSA-SR: strength of its pixel-level (fidelity) LoRA; with "
     "--semantic-strength its adjustable mode (unset: its default mode; the other families have one LoRA set)"),
    ("--semantic-strength", "semantic_strength", "PiSA-SR: strength of its semantic-level LoRA"),
    ("--upscale-by", "upscale_by", "scale factor (4 as trained)"),
    ("--lf-strength", "lf.strength", "effective LF injection strength (0 = off)"),
    ("--hf-strength", "hf.strength", "effective HF injection strength (0 = off)"),
    ("--filter", "lf.filter", "Butterworth geometry of both injections"),
    ("--color-fix", "color_fix", "colour correction towards the upscaled input"),
    ("--latent-mode", "latent_mode", "sample the VAE latent with --seed, or take its mode"),
    ("--seed", "seed", "seed of the latent sample, 0 to 2^64-1"),
    ("--tile-size", "tile_size", "U-Net latent tile (0 = never tile)"),
    ("--tile-overlap", "tile_overlap", "overlap of U-Net tiles, below --tile-size"),
    ("--encode-tile", "encode_tile_size", "VAE encoder tile in pixels, >= 8 (0 = never tile)"),
    ("--decode-tile", "decode_tile_size", "VAE decoder tile in latent pixels (0 = never tile)"),
    ("--vae-memory", "vae_memory_mb", "most MB of RAM for the tiled VAE's whole-image maps (default: what is "
     "free beyond 2 GB; on a GPU they take its free memory first); the rest wait in temporary files in TMPDIR"),
)  # fmt: skip


def flag_of(setting: str | None) -> str | None:
    """The flag that sets ``setting`` (``--filter`` sets both branches' filter)."""
    if setting == "hf.filter":
        setting = "lf.filter"
    return next((flag for flag, name, _ in SETTING_FLAGS if name == setting), None)


def settings_from_args(args: argparse.Namespace) -> UpscaleSettings:
    """The settings, or a ``SettingsError`` that names the flag (argparse already checked each value alone)."""
    from ..settings import HighFrequencySettings, LowFrequencySettings

    value = vars(args)
    try:
        return UpscaleSettings(
            **{name: value[name] for _, name, _ in SETTING_FLAGS if "." not in name},
            lf=LowFrequencySettings(strength=value["lf.strength"], filter=value["lf.filter"]),
            hf=HighFrequencySettings(strength=value["hf.strength"], filter=value["lf.filter"]),
        )
    except SettingsError as error:
        flag = flag_of(error.setting)
        if flag is None:
            raise
        raise SettingsError(f"argument {flag}: {error.problem}") from None


def check_output_folder(folder: Path) -> None:
    """``-o`` is a folder this process can write into (created if missing)."""
    if folder.exists() and not folder.is_dir():
        raise SettingsError(f"argument -o/--output: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fidesr-write-test-"):
            pass
    except OSError as error:
        raise SettingsError(f"argument -o/--output: cannot write into {folder} ({error.strerror or error})") from None


def _plan(args: argparse.Namespace) -> list[tuple[Path, Path]] | str:
    """The planned ``(input, output)`` pairs, or the one-line reason there is no plan."""
    try:
        return plan_outputs(args.inputs, args.output, recursive=args.recursive)
    except (FiDeSRError, OSError) as error:
        return str(error)


def _summary(result: BatchResult, planned: int, output: Path) -> None:
    if not (result.written or result.failed or result.interrupted):
        print(f"nothing to do: all {planned} outputs exist in {output} (use --overwrite to redo)")
        return
    print(f"written {len(result.written)}, skipped {len(result.skipped)} (exist), failed {len(result.failed)}")
    for source, reason in result.failed:
        print(f"  {source}: {reason}", file=sys.stderr)
    if result.interrupted:
        print("interrupted (finished outputs are complete; nothing half-written was kept)", file=sys.stderr)


def _upscale_share(args: argparse.Namespace, settings: UpscaleSettings, ranks: PartialState, todo: list) -> BatchResult:
    from ..loading.base_model import load_base_model
    from ..loading.restorer import assemble_restorer
    from ..loading.weights import load_restorer_weights
    from ..networks.families import FAMILY_NAMES
    from ..precision import precision_why

    weights = load_restorer_weights(args.weights)
    weights.metadata.setdefault("path", str(args.weights))
    if (args.pixel_strength is not None or args.semantic_strength is not None) and weights.family != "pisa-sr":
        raise SettingsError(
            f"argument --pixel-strength/--semantic-strength: applies to PiSA-SR's two LoRA sets; {args.weights} "
            f"holds {FAMILY_NAMES[weights.family]} weights, which have one"
        )
    device = rank_device(ranks, args.device)
    model = assemble_restorer(
        load_base_model(args.base), weights, prompt=args.prompt, precision=args.precision, device=device
    )
    where = f"rank {ranks.process_index} of {ranks.num_processes}, " if ranks.num_processes > 1 else ""
    described, why = model.description, precision_why(args.precision, model.device)  # why: auto's reason
    line = (
        f"{described['family']} on {described['device']} ({described['precision']}, {why}, {where}{len(todo)} image(s))"
    )
    sys.stdout.write(line + "\n")  # one write: print() sends the newline apart when unbuffered, and ranks' lines mix
    return upscale_files(
        model,
        todo,
        settings,
        overwrite=args.overwrite,
        max_image_pixels=args.max_image_pixels,
        show_progress=ranks.is_main_process,
    )


def run(args: argparse.Namespace) -> int:
    # Our guard (load_image's max_pixels, naming the size and the flag) replaces PIL's while the command runs.
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return _run(args)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def _run(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list, gather_object

    with joined_ranks() as ranks:
        try:  # the same checks on every rank: only rank 0 says what is wrong
            settings = settings_from_args(args)
            if args.max_image_pixels < 0:
                raise SettingsError(
                    f"argument --max-image-pixels: must be 0 (no limit) or more, got {args.max_image_pixels}"
                )
            check_output_folder(args.output)
            (plan,) = broadcast_object_list([_plan(args) if ranks.is_main_process else None])
            if isinstance(plan, str):
                raise ImageInputError(plan)
        except (FiDeSRError, OSError) as error:
            if args.verbose:
                raise
            if ranks.is_main_process:
                print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        with ranks.split_between_processes(plan) as share:
            todo = pending(share, overwrite=args.overwrite)
            to_write = {target for _, target in todo}
            result = BatchResult(skipped=[target for _, target in share if target not in to_write])
        if todo:
            result.merge(_upscale_share(args, settings, ranks, todo))
        total = BatchResult()
        for part in gather_object([result]):
            total.merge(part)
    if ranks.is_main_process:
        _summary(total, len(plan), args.output)
    if total.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if total.failed else 0
