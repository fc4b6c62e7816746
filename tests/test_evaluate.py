"""training.evaluate: pairing, errors, outputs (table, CSV, JSON) and the command line.

Offline: images are tiny PNGs written to tmp_path, and a small fake module replaces pyiqa so the
plumbing is tested with known metric values.  Y-channel PSNR/SSIM against numpy and running
without the library: ``test_evaluate_metrics.py``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluate_helpers import flat_image, quiet, touch_images, write_image

from fidesr_core.errors import ImageInputError, SettingsError
from training.evaluate import evaluate_folders, format_table, main, pair_images, write_csv, write_json
from training.metrics import PAPER_METRICS, parse_metric_names


class FakePyiqa(types.ModuleType):
    """Stands in for pyiqa: FR metric = mean |SR - HQ|, NR metric = mean SR, FID = file counts."""

    def __init__(self) -> None:
        super().__init__("pyiqa")
        self.__version__ = "0.0-fake"
        self.created: dict[str, dict] = {}
        self.shapes: list[tuple[int, ...]] = []
        self.fid_folders: list[tuple[list[str], list[str]]] = []

    def create_metric(self, name: str, device=None, **options):
        self.created[name] = options
        if name == "fid":

            def fid(sr_dir: str, hq_dir: str, **_: object) -> float:
                listing = (sorted(os.listdir(sr_dir)), sorted(os.listdir(hq_dir)))
                self.fid_folders.append(listing)
                return 1000.0 * len(listing[0]) + len(listing[1])

            return fid
        full_reference = name in ("psnr", "ssim", "lpips", "dists")

        def score(sr: torch.Tensor, hq: torch.Tensor | None = None) -> torch.Tensor:
            self.shapes.append(tuple(sr.shape))
            if full_reference:
                return (sr - hq).abs().mean().reshape(1)
            return sr.mean().reshape(1, 1)

        return score


@pytest.fixture
def fake_pyiqa(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePyiqa]:
    fake = FakePyiqa()
    monkeypatch.setitem(sys.modules, "pyiqa", fake)
    had_pkg_resources = "pkg_resources" in sys.modules
    yield fake
    if not had_pkg_resources:  # CLIPIQA may have registered the pkg_resources stand-in
        sys.modules.pop("pkg_resources", None)


# ---------------------------------------------------------------- pairing


def test_pairing_by_stem_with_suffixes_and_unmatched_reporting(tmp_path: Path) -> None:
    touch_images(tmp_path / "hq", ["0001.png", "0002.png", "0003.png", "a.png", "a_b.png", "only_hq.jpg"])
    touch_images(tmp_path / "sr", ["0001.jpg", "0002_x4.png", "0003-fidesr.webp", "a_b_x4.png", "stray.png"])
    (tmp_path / "sr" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "sr" / ".0004.png", flat_image(1))  # hidden file

    pairing = pair_images(tmp_path / "sr", tmp_path / "hq")
    paired = {pair.hq.name: pair.sr.name for pair in pairing.pairs}
    assert paired == {
        "0001.png": "0001.jpg",
        "0002.png": "0002_x4.png",
        "0003.png": "0003-fidesr.webp",
        "a_b.png": "a_b_x4.png",  # the longest HQ key wins over "a"
    }
    assert [p.name for p in pairing.unmatched_sr] == ["stray.png"]
    assert [p.name for p in pairing.unmatched_hq] == ["a.png", "only_hq.jpg"]


def test_pairing_with_explicit_suffixes(tmp_path: Path) -> None:
    touch_images(tmp_path / "hq", ["Canon_001_HR.png", "Canon_002_HR.png"])
    touch_images(tmp_path / "sr", ["Canon_001_LR4.png", "Canon_002_LR4.png"])
    assert pair_images(tmp_path / "sr", tmp_path / "hq").pairs == ()
    pairing = pair_images(tmp_path / "sr", tmp_path / "hq", sr_suffix="_LR4", hq_suffix="_HR")
    assert [(p.key, p.sr.name, p.hq.name) for p in pairing.pairs] == [
        ("Canon_001", "Canon_001_LR4.png", "Canon_001_HR.png"),
        ("Canon_002", "Canon_002_LR4.png", "Canon_002_HR.png"),
    ]


def test_pairing_ambiguities_are_errors(tmp_path: Path) -> None:
    touch_images(tmp_path / "hq", ["0001.png"])
    touch_images(tmp_path / "sr", ["0001.png", "0001_x4.png"])
    with pytest.raises(ImageInputError, match=r"0001\.png and 0001_x4\.png both pair with HQ image 0001\.png"):
        pair_images(tmp_path / "sr", tmp_path / "hq")
    touch_images(tmp_path / "hq2", ["0001.png", "0001.jpg"])
    with pytest.raises(ImageInputError, match=r"HQ folder has two images for '0001'"):
        pair_images(tmp_path / "sr", tmp_path / "hq2")


def test_empty_and_missing_folders_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    touch_images(tmp_path / "hq", ["0001.png"])
    with pytest.raises(ImageInputError, match=r"SR folder .*empty holds no images"):
        pair_images(tmp_path / "empty", tmp_path / "hq")
    with pytest.raises(ImageInputError, match=r"HQ folder .*missing does not exist"):
        pair_images(tmp_path / "empty", tmp_path / "missing")


# ---------------------------------------------------------------- errors while scoring (fake library)


def test_size_mismatch_names_both_files(tmp_path: Path, fake_pyiqa: FakePyiqa) -> None:
    write_image(tmp_path / "hq" / "0001.png", flat_image(10, (12, 10)))
    write_image(tmp_path / "sr" / "0001_x4.png", flat_image(10, (12, 11)))
    with pytest.raises(ImageInputError, match=r"SR .*0001_x4\.png is 11x12 but HQ .*0001\.png is 10x12"):
        evaluate_folders(tmp_path / "sr", tmp_path / "hq", **quiet(metrics="psnr", device="cpu"))


def test_unreadable_image_is_named(tmp_path: Path, fake_pyiqa: FakePyiqa) -> None:
    write_image(tmp_path / "hq" / "0001.png", flat_image(10))
    (tmp_path / "sr").mkdir()
    (tmp_path / "sr" / "0001.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageInputError, match=r"0001\.png"):
        evaluate_folders(tmp_path / "sr", tmp_path / "hq", **quiet(metrics="psnr", device="cpu"))


def test_unknown_metric_lists_known_ones() -> None:
    with pytest.raises(SettingsError, match=r"unknown metric\(s\) brisque, psnry; known: psnr, ssim, lpips"):
        parse_metric_names("psnr,brisque,psnry")
    assert parse_metric_names("FID, psnr") == ("psnr", "fid")  # Table 1 order, case-insensitive
    assert parse_metric_names("all") == PAPER_METRICS


def test_strict_and_no_pairs(tmp_path: Path, fake_pyiqa: FakePyiqa) -> None:
    touch_images(tmp_path / "hq", ["0001.png", "0002.png"])
    touch_images(tmp_path / "sr", ["0001.png"])
    with pytest.raises(ImageInputError, match=r"1 HQ image\(s\) have no partner: 0002\.png"):
        evaluate_folders(tmp_path / "sr", tmp_path / "hq", **quiet(metrics="psnr", device="cpu", strict=True))
    touch_images(tmp_path / "other", ["zzz.png"])
    with pytest.raises(ImageInputError, match=r"no SR image .* pairs with an HQ image"):
        evaluate_folders(tmp_path / "other", tmp_path / "hq", **quiet(metrics="psnr", device="cpu"))


def test_crop_border_reaches_the_metrics(tmp_path: Path, fake_pyiqa: FakePyiqa) -> None:
    write_image(tmp_path / "hq" / "0001.png", flat_image(10, (12, 10)))
    write_image(tmp_path / "sr" / "0001.png", flat_image(20, (12, 10)))
    evaluate_folders(tmp_path / "sr", tmp_path / "hq", **quiet(metrics="psnr,musiq", device="cpu", crop_border=2))
    assert fake_pyiqa.shapes == [(1, 3, 8, 6), (1, 3, 8, 6)]
    with pytest.raises(SettingsError, match=r"--crop-border 5 leaves nothing of .*0001\.png"):
        evaluate_folders(tmp_path / "sr", tmp_path / "hq", **quiet(metrics="psnr", device="cpu", crop_border=5))


# ---------------------------------------------------------------- outputs (fake library: known values)


def _three_pairs_with_extras(root: Path) -> list[tuple[int, int]]:
    values = [(40, 50), (100, 100), (200, 180)]  # (SR grey level, HQ grey level)
    for index, (sr_value, hq_value) in enumerate(values):
        write_image(root / "sr" / f"im{index}_out.png", flat_image(sr_value))
        write_image(root / "hq" / f"im{index}.png", flat_image(hq_value))
    write_image(root / "sr" / "extra.png", flat_image(0))  # unmatched: must stay out of FID
    return values


def test_means_fid_table_csv_and_json(tmp_path: Path, fake_pyiqa: FakePyiqa) -> None:
    values = _three_pairs_with_extras(tmp_path)
    result = evaluate_folders(
        tmp_path / "sr", tmp_path / "hq", **quiet(metrics="all", device="cpu", name="mine", crop_border=1)
    )
    full_reference = [abs(s - h) / 255 for s, h in values]
    no_reference = [s / 255 for s, _ in values]
    assert result.means["lpips"] == pytest.approx(np.mean(full_reference), abs=1e-6)
    assert result.means["musiq"] == pytest.approx(np.mean(no_reference), abs=1e-6)
    assert result.means["fid"] == 3003.0  # three SR files against three HQ files
    assert fake_pyiqa.fid_folders[0][0] == ["000000.png", "000001.png", "000002.png"]
    assert fake_pyiqa.created["psnr"] == {"test_y_channel": True, "color_space": "ycbcr"}
    assert fake_pyiqa.created["ssim"] == {"test_y_channel": True, "color_space": "ycbcr"}

    table = format_table(result, "realsr").splitlines()
    assert table[0].split() == ["RealSR", "PSNR↑", "SSIM↑", "LPIPS↓", "DISTS↓", "CLIPIQA↑", "NIQE↓", "MUSIQ↑"] + [
        "MANIQA↑",
        "FID↓",
    ]
    paper = "FiDeSR (paper) 26.02 0.7457 0.2626 0.1965 0.6896 5.3194 69.82 0.6681 109.68"
    assert " ".join(table[1].split()) == paper
    mine = table[2].split()
    assert mine[0] == "mine"
    assert mine[3] == f"{np.mean(full_reference):.4f}"  # LPIPS column
    assert mine[7] == f"{np.mean(no_reference):.2f}"  # MUSIQ column, two decimals as in the paper
    assert mine[9] == "3003.00"
    assert format_table(result, "drealsr").splitlines()[1].split()[2] == "28.90"
    assert "(-)" in format_table(result, arrows=False).splitlines()[0]

    write_csv(result, tmp_path / "out" / "m.csv")
    write_json(result, tmp_path / "out" / "m.json", "drealsr")
    with open(tmp_path / "out" / "m.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == ["im0", "im1", "im2", "mean"]
    assert [row["sr_file"] for row in rows[:3]] == ["im0_out.png", "im1_out.png", "im2_out.png"]
    assert float(rows[2]["lpips"]) == pytest.approx(full_reference[2], abs=1e-6)
    assert rows[0]["fid"] == "" and float(rows[3]["fid"]) == 3003.0
    document = json.loads((tmp_path / "out" / "m.json").read_text(encoding="utf-8"))
    assert document["metrics"] == list(PAPER_METRICS)
    assert document["mean"]["musiq"] == pytest.approx(np.mean(no_reference), abs=1e-6)
    assert [entry["image"] for entry in document["per_image"]] == ["im0", "im1", "im2"]
    assert document["per_image"][1]["lpips"] == pytest.approx(0.0, abs=1e-9)
    assert document["unmatched"] == {"sr": ["extra.png"], "hq": []}
    assert document["reference"]["values"]["fid"] == 127.97
    assert document["settings"]["crop_border"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.csv", "m.json"]  # no temp files left


def test_non_finite_values_are_null_in_json(tmp_path: Path, fake_pyiqa: FakePyiqa) -> None:
    _three_pairs_with_extras(tmp_path)
    result = evaluate_folders(tmp_path / "sr", tmp_path / "hq", **quiet(metrics="psnr", device="cpu"))
    result.per_image[0]["psnr"] = math.inf
    result.means["psnr"] = math.inf
    write_json(result, tmp_path / "r.json")
    write_csv(result, tmp_path / "r.csv")
    document = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert document["mean"]["psnr"] is None and document["per_image"][0]["psnr"] is None
    assert "inf" in (tmp_path / "r.csv").read_text(encoding="utf-8").splitlines()[1]


def test_cli_writes_outputs_and_prints_table(
    tmp_path: Path, fake_pyiqa: FakePyiqa, capsys: pytest.CaptureFixture[str]
) -> None:
    _three_pairs_with_extras(tmp_path)
    argv = ["--sr", str(tmp_path / "sr"), "--hq", str(tmp_path / "hq"), "--metrics", "psnr,clipiqa"]
    assert main([*argv, "--device", "cpu", "--name", "run1", "--reference", "realsr", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "FiDeSR (paper)" in captured.out and "run1" in captured.out
    assert "1 SR image(s) have no partner: extra.png" in captured.err
    assert "CLIPIQA: loading its weights" in captured.err
    assert (tmp_path / "sr_metrics.csv").is_file() and (tmp_path / "sr_metrics.json").is_file()

    assert main([*argv, "--out", str(tmp_path / "x" / "run"), "--no-progress", "--device", "cpu"]) == 0
    assert (tmp_path / "x" / "run.json").is_file()

    assert main(["--sr", str(tmp_path / "sr"), "--hq", str(tmp_path / "hq"), "--metrics", "psnr,nope"]) == 2
    assert "unknown metric(s) nope; known: psnr, ssim" in capsys.readouterr().err
