"""Batch upscaling that never loses a file: the CLI's argument checks, per-image failures, outputs.

Argument checks run before any model is loaded: those tests give a ``--base`` that does not
exist, so reaching the loader would end in another error. The batch tests run the real
``upscale`` command on a tiny random model written to disk.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_export import write_diffusers_folder
from PIL import Image

from fidesr_core import __version__
from fidesr_core.app import cli
from fidesr_core.app.batch import plan_outputs, upscale_files
from fidesr_core.errors import ImageInputError, WeightsFileError
from fidesr_core.loading.weights import save_restorer_weights
from fidesr_core.networks.tiny import tiny_fidesr_weights
from fidesr_core.settings import UpscaleSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_files(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    save_restorer_weights(tiny_fidesr_weights(tiny, seed=4), folder / "fidesr.pkl")
    write_diffusers_folder(tiny, folder / "sd21-tiny")
    return {"base": folder / "sd21-tiny", "weights": folder / "fidesr.pkl"}


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    try:
        code = cli.main([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse's own exits (--help, --version, usage errors)
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _upscale(base: Path, weights: Path, *inputs: object, output: Path) -> list[object]:
    return [
        "upscale",
        *inputs,
        "-o",
        output,
        "--base",
        base,
        "--weights",
        weights,
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--latent-mode",
        "mode",
    ]


# ------------------------------------------------------------------ arguments, before any model


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--upscale-by", "0"),
        ("--upscale-by", "-1"),
        ("--upscale-by", "100"),
        ("--upscale-by", "nan"),
        ("--upscale-by", "inf"),
        ("--encode-tile", "7"),
        ("--encode-tile", "-5"),
        ("--decode-tile", "-1"),
        ("--seed", str(2**64)),
        ("--seed", "-1"),
        ("--tile-size", "-5"),
        ("--tile-overlap", "96"),
        ("--lf-strength", "nan"),
        ("--hf-strength", "inf"),
        ("--max-image-pixels", "-1"),
        ("--vae-memory", "-1"),
    ],
)
def test_bad_settings_exit_2_in_one_line_naming_the_flag_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str
) -> None:
    Image.fromarray(_photo(8, 8)).save(tmp_path / "a.png")
    args = _upscale(tmp_path / "no-base", tmp_path / "no-weights", tmp_path / "a.png", output=tmp_path / "out")
    code, _, err = _run(capsys, *args, flag, value)
    assert code == 2
    assert err.startswith(f"error: argument {flag}: must") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "a.png").exists()


def test_output_that_is_a_file_or_cannot_be_written_is_found_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    Image.fromarray(_photo(8, 8)).save(tmp_path / "a.png")
    (tmp_path / "taken").write_text("a file")
    for output, expected in (
        (tmp_path / "taken", "is a file, not a folder"),
        (tmp_path / "taken" / "below", "cannot write into"),
        (Path("/proc/fidesr-out"), "cannot write into"),  # not writable even for root
    ):
        args = _upscale(tmp_path / "no-base", tmp_path / "no-weights", tmp_path / "a.png", output=output)
        code, _, err = _run(capsys, *args)
        assert code == 2 and err.startswith("error: argument -o/--output: ") and expected in err, err
        assert len(err.strip().splitlines()) == 1


def test_an_output_never_replaces_an_input_even_with_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(8, 8)).save(photos / "a.png")
    Image.fromarray(_photo(8, 8, seed=1)).save(photos / "b.jpg")
    before = {path.name: path.read_bytes() for path in photos.iterdir()}
    args = _upscale(tmp_path / "no-base", tmp_path / "no-weights", photos, output=photos)
    code, _, err = _run(capsys, *args, "--overwrite")
    assert code == 2 and "would replace the input" in err and "a.png" in err, err
    assert {path.name: path.read_bytes() for path in photos.iterdir()} == before


def test_recursive_mirrors_the_input_folders_and_leaves_outputs_out_of_the_inputs(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for relative in ("a/IMG_1.jpg", "b/IMG_1.jpg", "top.png", "b/c/deep.webp"):
        (photos / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(8, 8)).save(photos / relative)
    output = photos / "upscaled"  # inside the input tree: earlier outputs must not become inputs
    (output / "a").mkdir(parents=True)
    Image.fromarray(_photo(8, 8)).save(output / "a" / "IMG_1.png")
    pairs = plan_outputs([photos], output, recursive=True)
    assert [(s.relative_to(photos).as_posix(), t.relative_to(output).as_posix()) for s, t in pairs] == [
        ("a/IMG_1.jpg", "a/IMG_1.png"),
        ("b/IMG_1.jpg", "b/IMG_1.png"),
        ("b/c/deep.webp", "b/c/deep.png"),
        ("top.png", "top.png"),
    ]
    with pytest.raises(ImageInputError, match="would both be written to"):  # without --recursive: one folder
        plan_outputs([photos / "a", photos / "b"], output)


# ------------------------------------------------------------------ the batch goes on


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (its data is a few bytes: a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_every_kind_of_per_image_failure_is_listed_and_the_batch_goes_on(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    photos, output, extra = tmp_path / "photos", tmp_path / "out", tmp_path / "extra"
    for folder in (photos / "a", photos / "b", extra):
        folder.mkdir(parents=True)
    Image.fromarray(_photo(8, 8)).save(photos / "good.png")
    Image.fromarray(_photo(8, 8, seed=1)).save(photos / "a" / "IMG_1.jpg")
    Image.fromarray(_photo(8, 8, seed=2)).save(photos / "b" / "IMG_1.jpg")
    long_name = "x" * 240 + ".png"  # fits the file system; its temporary name once did not
    Image.fromarray(_photo(8, 8, seed=3)).save(photos / long_name)
    (photos / "empty.png").write_bytes(b"")
    (photos / "bomb.png").write_bytes(_png_declaring(60000, 60000))
    frames = [Image.fromarray(_photo(8, 8, seed=seed)) for seed in (4, 5)]
    frames[0].save(photos / "moving.png", save_all=True, append_images=frames[1:])
    Image.fromarray(_photo(1, 20000)).save(photos / "strip.png")
    Image.fromarray(_photo(8, 8, seed=6)).save(photos / "blocked.png")
    (output / "blocked.png").mkdir(parents=True)  # a folder where the output should go
    Image.fromarray(_photo(8, 8, seed=7)).save(extra / "still.gif")

    args = _upscale(model_files["base"], model_files["weights"], photos, extra / "still.gif", output=output)
    code, out, err = _run(capsys, *args, "--recursive")

    assert code == 1
    assert "written 4, skipped 0 (exist), failed 6" in out
    failures = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1] for line in err.splitlines() if ": " in line}
    assert failures[str(photos / "empty.png")] == "the file is empty (0 bytes)"
    assert "60000x60000 pixels" in failures[str(photos / "bomb.png")]
    assert "--max-image-pixels" in failures[str(photos / "bomb.png")]
    assert failures[str(photos / "moving.png")].startswith("an animated image (2 frames)")
    assert "too thin" in failures[str(photos / "strip.png")]
    assert failures[str(photos / "blocked.png")] == f"cannot write {output / 'blocked.png'}: Is a directory"
    assert failures[str(extra / "still.gif")] == "not a PNG, JPEG or WebP file"
    for reason in failures.values():
        assert str(photos) not in reason.split("cannot write")[0]  # the input's path is said once, not twice
        assert ".part" not in reason
    for written in ("good.png", "a/IMG_1.png", "b/IMG_1.png", long_name):
        with Image.open(output / written) as image:
            assert image.size == (32, 32) and image.mode == "RGB", written
    assert not [path for path in output.rglob("*") if path.name.endswith(".part")]


def test_only_complete_pngs_count_as_done(tiny_model, tmp_path: Path) -> None:
    sources, targets = [], []
    for index, existing in enumerate((b"", b"\x89PNG\r\n\x1a\n cut short", None, "complete")):
        source = tmp_path / f"in{index}.png"
        Image.fromarray(_photo(8, 8, seed=index)).save(source)
        target = tmp_path / "out" / f"in{index}.png"
        target.parent.mkdir(exist_ok=True)
        if existing == "complete":
            Image.fromarray(_photo(8, 8)).save(target)
        elif existing is not None:
            target.write_bytes(existing)
        sources.append(source)
        targets.append(target)
    complete = targets[3].read_bytes()
    result = upscale_files(
        tiny_model, list(zip(sources, targets, strict=True)), UpscaleSettings(process_size=64), show_progress=False
    )
    assert result.written == targets[:3] and result.skipped == [targets[3]] and not result.failed
    assert targets[3].read_bytes() == complete
    for target in targets[:3]:
        with Image.open(target) as image:
            assert image.size == (32, 32)


def test_out_of_memory_on_one_image_is_listed_and_the_next_one_is_done(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fidesr_core import pipeline

    real_encode, calls = pipeline.encode_image, []

    def runs_out_on_the_first(model, pixels, **kwargs):  # fault injection: the first image exhausts memory
        calls.append(kwargs["tile_size"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_encode(model, pixels, **kwargs)

    monkeypatch.setattr(pipeline, "encode_image", runs_out_on_the_first)
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(_photo(16, 16)).save(big)
    Image.fromarray(_photo(8, 8)).save(small)
    pairs = [(big, tmp_path / "out" / "big.png"), (small, tmp_path / "out" / "small.png")]
    result = upscale_files(tiny_model, pairs, UpscaleSettings(process_size=64), show_progress=False)
    # The engine found no smaller tile to try (64 px images, 128 px the smallest encoder tile): one line says so.
    assert result.failed == [
        (
            big,
            "the encode stage ran out of memory with tiles of 64 pixels and one image at a time; free memory, use a "
            "lower precision, a smaller upscale factor or a smaller image",
        )
    ]
    assert result.written == [tmp_path / "out" / "small.png"] and calls == [1024, 1024]


def test_ctrl_c_still_prints_the_summary(
    model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fidesr_core.app import batch

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(_photo(8, 8)).save(photos / name)
    real_upscale_file = batch.upscale_file

    def interrupted_on_b(model, source, target, settings, **kwargs):
        if source.name == "b.png":
            raise KeyboardInterrupt
        return real_upscale_file(model, source, target, settings, **kwargs)

    monkeypatch.setattr(batch, "upscale_file", interrupted_on_b)
    code, out, err = _run(capsys, *_upscale(model_files["base"], model_files["weights"], photos, output=tmp_path / "o"))
    assert code == 130 and "written 1, skipped 0 (exist), failed 0" in out and "interrupted" in err


# ------------------------------------------------------------------ the program itself


def test_help_version_and_verbose_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "`" not in out
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip().endswith(f" {__version__}")
    with pytest.raises(WeightsFileError, match="missing.pkl"):  # -v after the subcommand: the full traceback
        cli.main(["info", str(tmp_path / "missing.pkl"), "-v"])
    code, _, err = _run(capsys, "upscale", "--no-such-flag")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_the_program_names_itself_as_it_was_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fidesr_core", "--help"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m fidesr_core ")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "fidesr")])  # as the console script starts it
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and out.startswith("usage: fidesr ")


def test_convert_asks_for_overwrite_before_replacing(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "fidesr.pkl"
    save_restorer_weights(tiny_fidesr_weights(tiny, seed=4), source)
    destination = tmp_path / "fidesr.safetensors"
    destination.write_bytes(b"keep me")
    code, _, err = _run(capsys, "convert", source, destination)
    assert code == 2 and "--overwrite" in err and destination.read_bytes() == b"keep me"
    code, _, _ = _run(capsys, "convert", source, destination, "--overwrite")
    assert code == 0 and destination.read_bytes() != b"keep me"
