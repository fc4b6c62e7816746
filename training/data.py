"""Training data: HQ images with optional captions, random crops, and a step-indexed sampler.

The LQ inputs are not made here: the trainer degrades each HQ batch on its device
(:func:`training.degradation.degrade`) so the Real-ESRGAN chain runs batched on the GPU.

Reproducibility and exact resume rest on one idea: every random choice is a pure
function of the run seed and a *position*.  Sample position ``k`` of the run
(counted over all processes and micro-steps) is image ``perm_e[k mod n]`` with
``perm_e`` a permutation seeded by ``(seed, e = k div n)``, and its crop and flip
come from a generator seeded by ``(seed, k)``.  :class:`StepBatchSampler` hands
process ``p`` the positions ``m·B·P + p·B + [0, B)`` for micro-step ``m``, so a run
resumed at micro-step ``m`` sees exactly the data the uninterrupted run would,
whatever the number of data-loader workers.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from fidesr_core.app.image_io import DATASET_IMAGE_EXTENSIONS, image_files_in
from fidesr_core.errors import ImageInputError, SettingsError

__all__ = [
    "ImageRecord",
    "derive_seed",
    "scan_image_folder",
    "read_image_list",
    "read_caption_mapping",
    "collect_records",
    "sample_index",
    "HQCropDataset",
    "StepBatchSampler",
]

_IMAGE_COLUMNS = ("image", "path", "file", "file_name", "filename", "name")
_CAPTION_COLUMNS = ("caption", "text", "prompt", "tags")


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute
    key: str  # path relative to the folder or list it came from (posix), for caption look-ups
    caption: str = ""


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``parts`` (numpy SeedSequence: no correlated streams)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(p) for p in parts)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


# --------------------------------------------------------------------------- finding images and captions


def scan_image_folder(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden files skipped)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SettingsError(f"HQ image folder {root} does not exist or is not a folder")
    return image_files_in(root, extensions=DATASET_IMAGE_EXTENSIONS, recursive=True)


def read_image_list(list_file: str | os.PathLike) -> list[Path]:
    """Paths listed one a line in ``list_file``; relative ones are taken from the list's folder.

    Blank lines and lines starting with ``#`` are skipped.  A listed file that does not
    exist raises ``SettingsError`` naming it (a typo should not silently shrink the data).
    """
    source = Path(list_file).expanduser()
    if not source.is_file():
        raise SettingsError(f"HQ image list {source} does not exist")
    paths = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else source.parent / path
        if not path.is_file():
            raise SettingsError(f"{source}, line {number}: image {path} does not exist")
        paths.append(path)
    return paths


def _pick(row: Mapping[str, object], names: Sequence[str], what: str, where: str) -> str:
    for name in names:
        if name in row and row[name] is not None:
            return str(row[name])
    raise SettingsError(f"{where}: no {what} field (expected one of {', '.join(names)})")


def read_caption_mapping(path: str | os.PathLike) -> dict[str, str]:
    """Captions from a ``.jsonl`` (one object a line) or ``.csv`` (with a header) file.

    Image fields: image / path / file / file_name / filename / name; caption fields:
    caption / text / prompt / tags (a list of tags is joined with ", ").  Keys are kept as
    written; :func:`collect_records` matches them by absolute path, relative path,
    file name or stem.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise SettingsError(f"caption file {source} does not exist")
    rows: list[tuple[str, Mapping[str, object]]] = []
    if source.suffix.lower() == ".jsonl":
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SettingsError(f"{source}, line {number}: not JSON ({error})") from error
            if not isinstance(row, dict):
                raise SettingsError(f"{source}, line {number}: expected a JSON object")
            rows.append((f"{source}, line {number}", row))
    elif source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                rows.append((f"{source}, line {number}", row))
    else:
        raise SettingsError(f"caption file {source}: expected a .jsonl or .csv file")
    mapping = {}
    for where, row in rows:
        caption = row.get(next((c for c in _CAPTION_COLUMNS if c in row), ""), None)
        if isinstance(caption, list):
            row = {**row, "caption": ", ".join(str(tag) for tag in caption)}
        mapping[_pick(row, _IMAGE_COLUMNS, "image", where)] = _pick(row, _CAPTION_COLUMNS, "caption", where).strip()
    return mapping


class _CaptionIndex:
    """Look-up of a caption mapping by absolute path, relative path, file name or stem."""

    def __init__(self, mapping: Mapping[str, str], base: Path) -> None:
        self.by_path: dict[Path, str] = {}
        self.by_key: dict[str, str] = {}
        names: dict[str, list[str]] = {}
        stems: dict[str, list[str]] = {}
        for key, caption in mapping.items():
            written = Path(key).expanduser()
            self.by_path[(written if written.is_absolute() else base / written).resolve()] = caption
            self.by_key[written.as_posix()] = caption
            names.setdefault(written.name, []).append(caption)
            stems.setdefault(written.stem, []).append(caption)
        # a name or stem that occurs twice is ambiguous and matches nothing
        self.by_name = {name: found[0] for name, found in names.items() if len(found) == 1}
        self.by_stem = {stem: found[0] for stem, found in stems.items() if len(found) == 1}

    def find(self, path: Path, key: str) -> str | None:
        for table, probe in (
            (self.by_path, path.resolve()),
            (self.by_key, key),
            (self.by_name, path.name),
            (self.by_stem, path.stem),
        ):
            if probe in table:
                return table[probe]
        return None


def _sidecar_caption(path: Path) -> str | None:
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    return sidecar.read_text(encoding="utf-8").strip()


def collect_records(
    folders: Sequence[str | os.PathLike] = (),
    lists: Sequence[str | os.PathLike] = (),
    *,
    captions: str | os.PathLike | None = None,
    sidecar_captions: bool = True,
) -> list[ImageRecord]:
    """Every HQ image of ``folders`` and ``lists`` with its caption ("" when none), duplicates dropped.

    A caption comes from the mapping file ``captions`` if it names the image, else from a
    sidecar ``IMAGE.txt`` when ``sidecar_captions``.
    """
    found: list[tuple[Path, str]] = []
    for folder in folders:
        root = Path(folder).expanduser()
        found.extend((path, path.relative_to(root).as_posix()) for path in scan_image_folder(root))
    for list_file in lists:
        root = Path(list_file).expanduser().parent
        for path in read_image_list(list_file):
            key = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
            found.append((path, key))
    if not found:
        raise SettingsError(
            "no HQ training images: set data.hq_folders and/or data.hq_lists "
            f"(folders {list(map(str, folders))}, lists {list(map(str, lists))})"
        )
    index = None
    if captions is not None:
        index = _CaptionIndex(read_caption_mapping(captions), Path(captions).expanduser().resolve().parent)
    records, seen = [], set()
    for path, key in found:
        absolute = path.resolve()
        if absolute in seen:
            continue
        seen.add(absolute)
        caption = index.find(absolute, key) if index is not None else None
        if caption is None and sidecar_captions:
            caption = _sidecar_caption(absolute)
        records.append(ImageRecord(path=absolute, key=key, caption=caption or ""))
    return records


# --------------------------------------------------------------------------- dataset and sampler


def sample_index(position: int, count: int, seed: int, cache: dict[int, torch.Tensor] | None = None) -> int:
    """Image index of sample ``position``: entry ``position mod count`` of epoch ``position div count``'s shuffle."""
    epoch, offset = divmod(int(position), count)
    permutation = cache.get(epoch) if cache is not None else None
    if permutation is None:
        generator = torch.Generator().manual_seed(derive_seed(seed, 0, epoch))
        permutation = torch.randperm(count, generator=generator)
        if cache is not None:
            cache.clear()  # one epoch at a time is enough: positions arrive in order
            cache[epoch] = permutation
    return int(permutation[offset])


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ImageInputError(f"training image {path} cannot be read: {error}") from error


def random_crop(image: Image.Image, size: int, rng: np.random.Generator, *, flip: bool) -> torch.Tensor:
    """A ``size``² crop ``[3, size, size]`` float32 in [0, 1]; smaller images are first scaled up
    (bicubic, aspect kept) so that their short side is ``size``."""
    width, height = image.size
    if min(width, height) < size:
        factor = size / min(width, height)
        width, height = max(size, round(width * factor)), max(size, round(height * factor))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    crop = image.crop((left, top, left + size, top + size))
    if flip and rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(crop, dtype=np.uint8)  # [size, size, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class HQCropDataset(Dataset):
    """Item ``position`` (any non-negative int): ``{"hq": [3, S, S] in [0, 1], "caption": str, "position": int}``.

    The image, crop and flip are functions of ``(seed, position)`` only (see the module doc).
    """

    def __init__(self, records: Sequence[ImageRecord], *, crop_size: int, flip: bool = True, seed: int = 0) -> None:
        if not records:
            raise SettingsError("HQCropDataset needs at least one image")
        self.records = list(records)
        self.crop_size = int(crop_size)
        self.flip = bool(flip)
        self.seed = int(seed)
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_captions(self) -> bool:
        return any(record.caption for record in self.records)

    def __getitem__(self, position: int) -> dict[str, object]:
        record = self.records[sample_index(position, len(self.records), self.seed, self._permutations)]
        rng = np.random.default_rng(derive_seed(self.seed, 1, int(position)))
        hq = random_crop(_load_rgb(record.path), self.crop_size, rng, flip=self.flip)
        return {"hq": hq, "caption": record.caption, "position": int(position)}


class StepBatchSampler(Sampler[list[int]]):
    """Batches of sample positions for one process, from micro-step ``start`` on, without end.

    Micro-step ``m`` of process ``p`` gets positions ``(m·P + p)·B + [0, B)``.
    """

    def __init__(
        self, *, batch_size: int, num_processes: int = 1, process_index: int = 0, start_micro_step: int = 0
    ) -> None:
        if batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes or start_micro_step < 0:
            raise SettingsError(
                f"StepBatchSampler: invalid batch_size={batch_size}, num_processes={num_processes}, "
                f"process_index={process_index}, start_micro_step={start_micro_step}"
            )
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.start_micro_step = start_micro_step

    def batch_positions(self, micro_step: int) -> list[int]:
        first = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        micro_step = self.start_micro_step
        while True:
            yield self.batch_positions(micro_step)
            micro_step += 1
