"""Atomic writes (``write_atomic`` / ``save_png_atomic``): whole files with normal permissions, or nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from fidesr_core.app.image_io import (
    DATASET_IMAGE_EXTENSIONS,
    collect_image_files,
    image_files_in,
    save_png_atomic,
)
from fidesr_core.atomic_write import write_atomic
from fidesr_core.errors import ImageInputError


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o640  # what 0o666 becomes under this mask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_umask_mode_even_when_the_writer_replaces_the_file(tmp_path: Path, umask_027) -> None:
    save_png_atomic(tmp_path / "a.png", torch.rand(3, 4, 5))
    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (5, 4)
    assert _mode(tmp_path / "a.png") == umask_027

    def replacing_writer(target: str) -> None:  # like safetensors: its own private temp file, renamed over
        private = Path(target).with_suffix(".private")
        private.write_bytes(b"weights")
        private.chmod(0o600)
        os.replace(private, target)

    write_atomic(tmp_path / "w.safetensors", replacing_writer)
    assert (tmp_path / "w.safetensors").read_bytes() == b"weights"
    assert _mode(tmp_path / "w.safetensors") == umask_027
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "w.safetensors"]  # no temp files left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a.png"
    target.parent.mkdir()
    target.write_bytes(b"old")

    def failing_writer(temp: str) -> None:
        Path(temp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, failing_writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["a.png"]


def test_image_folders_list_images_only_skipping_hidden_copies(tmp_path: Path) -> None:
    for name in ("b.png", "._b.png", "a.JPG", "notes.txt", "c.bmp", "sub/d.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_image_files([tmp_path])] == ["a.JPG", "b.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in collect_image_files([tmp_path], recursive=True)] == [
        "a.JPG",
        "b.png",
        "sub/d.webp",
    ]
    dataset = image_files_in(tmp_path, extensions=DATASET_IMAGE_EXTENSIONS)
    assert [p.name for p in dataset] == ["a.JPG", "b.png", "c.bmp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageInputError, match="holds no PNG, JPEG or WebP"):
        collect_image_files([tmp_path / "sub" / "d.webp", tmp_path / "empty"])


def test_a_long_name_is_written_although_the_temporary_name_is_longer(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 245 + ".png")  # 249 bytes: fits, but ".<name>.<random>.part" would not
    write_atomic(target, lambda temp: Path(temp).write_bytes(b"data"))
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
