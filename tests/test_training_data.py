"""Tests of the trainer's data side and configuration: image/caption collection, crops, the
step-indexed sampler, seeding, and the config file / override machinery.  No models, no downloads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fidesr_core.errors import SettingsError
from training.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from training.data import (
    HQCropDataset,
    StepBatchSampler,
    collect_records,
    derive_seed,
    random_crop,
    read_caption_mapping,
    read_image_list,
    sample_index,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "training" / "default_config.yaml"


def _save(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


# ---------------------------------------------------------------------------------------------- images and captions


def test_collect_records_from_folders_and_lists(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "x.png", 20, 20)
    _save(tmp_path / "a" / "sub" / "y.jpg", 20, 20, 1)
    (tmp_path / "a" / "notes.md").write_text("not an image")
    _save(tmp_path / "b" / "z.png", 20, 20, 2)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    # relative to the list's folder, an absolute path, a comment, a blank line and a duplicate of a folder image
    listing.write_text(f"../b/z.png\n# comment\n\n{tmp_path / 'a' / 'x.png'}\n")
    records = collect_records([tmp_path / "a"], [listing])
    names = [record.path.name for record in records]
    assert names == ["y.jpg", "x.png", "z.png"]  # folder scan sorted by path (sub/ < x), then the list; x once
    assert records[0].key == "sub/y.jpg"
    assert all(record.path.is_absolute() and record.caption == "" for record in records)


def test_missing_inputs_are_reported(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        collect_records([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match="no HQ training images"):
        collect_records([tmp_path / "empty"])
    listing = tmp_path / "list.txt"
    listing.write_text("missing.png\n")
    with pytest.raises(SettingsError, match="line 1"):
        read_image_list(listing)


def test_captions_from_sidecars_and_mappings(tmp_path: Path) -> None:
    for name in ("cat", "dog", "fox", "owl"):
        _save(tmp_path / "hq" / f"{name}.png", 20, 20)
    (tmp_path / "hq" / "cat.txt").write_text("  a cat on a sofa \n")
    (tmp_path / "hq" / "dog.txt").write_text("sidecar dog")
    records = {r.path.stem: r.caption for r in collect_records([tmp_path / "hq"])}
    assert records == {"cat": "a cat on a sofa", "dog": "sidecar dog", "fox": "", "owl": ""}

    mapping = tmp_path / "captions.jsonl"
    rows = [
        {"image": "hq/dog.png", "caption": "mapped dog"},  # relative to the mapping file
        {"file_name": "fox.png", "tags": ["fox", "snow"]},  # by file name, tags joined
    ]
    mapping.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    records = {r.path.stem: r.caption for r in collect_records([tmp_path / "hq"], captions=mapping)}
    assert records == {"cat": "a cat on a sofa", "dog": "mapped dog", "fox": "fox, snow", "owl": ""}
    no_sidecar = {
        r.path.stem: r.caption for r in collect_records([tmp_path / "hq"], captions=mapping, sidecar_captions=False)
    }
    assert no_sidecar["cat"] == ""

    table = tmp_path / "captions.csv"
    table.write_text('path,text\nowl,"an owl, at night"\n')  # by stem
    assert read_caption_mapping(table) == {"owl": "an owl, at night"}
    records = {r.path.stem: r.caption for r in collect_records([tmp_path / "hq"], captions=table)}
    assert records["owl"] == "an owl, at night"


def test_bad_caption_files(tmp_path: Path) -> None:
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    with pytest.raises(SettingsError, match="caption field"):
        read_caption_mapping(bad)
    bad.write_text("not json\n")
    with pytest.raises(SettingsError, match="line 1"):
        read_caption_mapping(bad)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(SettingsError, match=".jsonl or .csv"):
        read_caption_mapping(tmp_path / "c.txt")


# ---------------------------------------------------------------------------------------------- crops and order


def test_random_crop_is_a_window_of_the_image() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    crop = random_crop(Image.fromarray(pixels), 16, np.random.default_rng(5), flip=False)
    assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32
    target = (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    windows = [
        (top, left)
        for top in range(30 - 16 + 1)
        for left in range(40 - 16 + 1)
        if np.array_equal(pixels[top : top + 16, left : left + 16], target)
    ]
    assert len(windows) == 1


def test_small_images_are_scaled_up_to_the_crop() -> None:
    pixels = np.full((10, 20, 3), 77, dtype=np.uint8)
    crop = random_crop(Image.fromarray(pixels), 32, np.random.default_rng(0), flip=True)
    assert crop.shape == (3, 32, 32)
    assert torch.allclose(crop, torch.full_like(crop, 77 / 255), atol=1.5 / 255)


def test_dataset_items_depend_only_on_seed_and_position(tmp_path: Path) -> None:
    for index in range(5):
        _save(tmp_path / f"{index}.png", 24, 24, index)
    records = collect_records([tmp_path])
    dataset = HQCropDataset(records, crop_size=16, seed=7)
    other = HQCropDataset(records, crop_size=16, seed=7)
    for position in (0, 3, 11, 4):  # out of order on purpose
        a, b = dataset[position], other[position]
        assert torch.equal(a["hq"], b["hq"]) and a["position"] == position
    reseeded = HQCropDataset(records, crop_size=16, seed=8)
    assert any(not torch.equal(dataset[p]["hq"], reseeded[p]["hq"]) for p in range(5))
    # both flips occur over a handful of positions
    flips = HQCropDataset([records[0]], crop_size=24, seed=1)
    crops = [flips[p]["hq"] for p in range(12)]
    assert any(torch.equal(c, crops[0]) for c in crops[1:]) and any(torch.equal(c, crops[0].flip(-1)) for c in crops)


def test_every_epoch_is_a_permutation() -> None:
    epochs = [[sample_index(e * 7 + k, 7, seed=3) for k in range(7)] for e in range(3)]
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    cache: dict = {}
    assert [sample_index(k, 7, 3, cache) for k in range(21)] == [i for epoch in epochs for i in epoch]


def test_step_batch_sampler_splits_positions_between_processes() -> None:
    samplers = [StepBatchSampler(batch_size=3, num_processes=2, process_index=p, start_micro_step=0) for p in range(2)]
    streams = [iter(s) for s in samplers]
    seen = [position for _ in range(4) for stream in streams for position in next(stream)]
    assert seen == list(range(24))  # disjoint, contiguous, nothing skipped
    resumed = iter(StepBatchSampler(batch_size=3, num_processes=2, process_index=1, start_micro_step=2))
    assert next(resumed) == samplers[1].batch_positions(2) == [15, 16, 17]
    with pytest.raises(SettingsError):
        StepBatchSampler(batch_size=0)


def test_derive_seed_mixes_every_part() -> None:
    seeds = {derive_seed(1, a, b) for a in range(4) for b in range(4)} | {derive_seed(2, 0, 0)}
    assert len(seeds) == 17 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(5, 1, 2) == derive_seed(5, 1, 2)


# ---------------------------------------------------------------------------------------------- configuration


def test_default_yaml_is_the_paper_run() -> None:
    from_file = load_config(DEFAULT_CONFIG)
    defaults = TrainConfig()
    # the file only adds the data/model paths of the README layout
    assert from_file.model.base and from_file.data.hq_folders and from_file.data.hq_lists
    blank_paths = {
        "model": dataclasses.replace(from_file.model, base=""),
        "data": dataclasses.replace(from_file.data, hq_folders=[], hq_lists=[]),
    }
    assert dataclasses.replace(from_file, **blank_paths) == defaults
    assert (defaults.model.lora_rank, defaults.optim.learning_rate, defaults.optim.weight_decay) == (8, 5e-5, 1e-2)
    assert (defaults.loss.lambda_l2, defaults.loss.lambda_lpips, defaults.loss.lambda_csd) == (1.0, 2.0, 1.0)
    assert (defaults.loss.daw_start, defaults.loss.daw_ramp, defaults.loss.daw_alpha) == (2000, 1000, 0.6)
    assert (defaults.loss.daw_w_max, defaults.loss.daw_perceptual_mix) == (2.0, 0.5)
    assert (defaults.optim.max_grad_norm, defaults.optim.mixed_precision, defaults.data.caption_dropout) == (
        1.0,
        "fp16",
        0.5,
    )


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "optim.learning_rate=1e-4",
            "data.hq_folders=[a, b]",
            "model.tokenizer=null",
            "optim.gradient_checkpointing=true",
            "data.degradation={scale: 2}",
            "checkpoint.every=250",
            "loss.daw_start=0",
        ],
    )
    assert config.optim.learning_rate == 1e-4 and config.data.hq_folders == ["a", "b"]
    assert config.model.tokenizer is None and config.optim.gradient_checkpointing is True
    assert config.data.degradation == {"scale": 2} and config.checkpoint.every == 250 and config.loss.daw_start == 0
    with pytest.raises(SettingsError, match="did you mean 'learning_rate'"):
        load_config(None, ["optim.learning_rat=1"])
    with pytest.raises(SettingsError, match="must be an integer"):
        load_config(None, ["optim.batch_size=2.5"])
    with pytest.raises(SettingsError, match="mixed_precision"):
        load_config(None, ["optim.mixed_precision=fp8"])
    with pytest.raises(SettingsError, match="section.key=value"):
        apply_overrides({}, ["no_equals_sign"])


def test_toml_and_yaml_files_and_round_trip(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('seed = 5\n[optim]\nbatch_size = 2\nmax_steps = 10\n[checkpoint]\nformats = ["pkl"]\n')
    config = load_config(toml, ["optim.max_steps=12"], extra={"model.base": "tiny"})
    assert (config.seed, config.optim.batch_size, config.optim.max_steps) == (5, 2, 12)
    assert config.checkpoint.formats == ["pkl"] and config.model.base == "tiny"
    assert config_from_dict(config_to_dict(config)) == config
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_config(bad)
    with pytest.raises(SettingsError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
