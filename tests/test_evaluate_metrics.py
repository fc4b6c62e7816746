"""training.metrics: Y-channel PSNR/SSIM against an independent numpy definition, and the optional library.

Tests marked ``needs_pyiqa`` run the real library (only PSNR/SSIM, which download nothing) and are
skipped when it is not installed; the others check what happens without it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluate_helpers import quiet, touch_images, write_image
from numpy.lib.stride_tricks import sliding_window_view

from training import metrics as metrics_module
from training.evaluate import evaluate_folders, main
from training.metrics import MetricSuite, MetricUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _has_pyiqa() -> bool:
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        return False
    return True


needs_pyiqa = pytest.mark.skipif(not _has_pyiqa(), reason="pyiqa (the eval extra) is not installed")


# ---------------------------------------------------------------- independent PSNR/SSIM on Y (numpy)


def _y_bt601(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of 8-bit RGB on the [16, 235] scale."""
    return 16.0 + rgb.astype(np.float64) / 255.0 @ np.array([65.481, 128.553, 24.966])


def _psnr_y(a: np.ndarray, b: np.ndarray) -> float:
    return 10.0 * math.log10(255.0**2 / np.mean((_y_bt601(a) - _y_bt601(b)) ** 2))


def _ssim_y(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), valid region, K1 = 0.01, K2 = 0.03, L = 255."""
    offsets = np.arange(11) - 5
    gauss = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(gauss, gauss) / np.outer(gauss, gauss).sum()

    def local_mean(image: np.ndarray) -> np.ndarray:
        return np.einsum("ijkl,kl->ij", sliding_window_view(image, (11, 11)), window)

    x, y = _y_bt601(a), _y_bt601(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = local_mean(x), local_mean(y)
    vx, vy, cxy = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def _noisy_pair(rng: np.random.Generator, size: tuple[int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    hq = rng.integers(0, 256, (*size, 3)).astype(np.uint8)
    sr = np.clip(hq + rng.normal(0.0, sigma, hq.shape).round(), 0, 255).astype(np.uint8)
    return sr, hq


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


@needs_pyiqa
@pytest.mark.parametrize(("size", "sigma"), [((40, 48), 6.0), ((33, 57), 20.0), ((45, 38), 60.0)])
def test_psnr_ssim_on_y_match_numpy_definition(size: tuple[int, int], sigma: float) -> None:
    sr, hq = _noisy_pair(np.random.default_rng(int(sigma)), size, sigma)
    scores = MetricSuite(["psnr", "ssim"], "cpu", announce=lambda _line: None).score_pair(_tensor(sr), _tensor(hq))
    # pyiqa computes PSNR in float32 and rounds Y to integers for SSIM: differences stay far below
    # what a wrong colour space would give (YIQ instead of BT.601 Y shifts PSNR by about 1.3 dB).
    assert scores["psnr"] == pytest.approx(_psnr_y(sr, hq), abs=2e-3)
    assert scores["ssim"] == pytest.approx(_ssim_y(sr, hq), abs=5e-4)


@needs_pyiqa
def test_folders_through_files_match_numpy_and_identical_folders_score_perfectly(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    expected_psnr, expected_ssim = [], []
    for index in range(3):
        sr, hq = _noisy_pair(rng, (36, 44), 12.0)
        write_image(tmp_path / "sr" / f"{index:04d}_x4.png", sr)
        write_image(tmp_path / "hq" / f"{index:04d}.png", hq)
        write_image(tmp_path / "same" / f"{index:04d}.png", hq)
        expected_psnr.append(_psnr_y(sr, hq))
        expected_ssim.append(_ssim_y(sr, hq))
    result = evaluate_folders(tmp_path / "sr", tmp_path / "hq", **quiet(metrics="psnr,ssim", device="cpu"))
    assert [s["psnr"] for s in result.per_image] == pytest.approx(expected_psnr, abs=2e-3)
    assert result.means["ssim"] == pytest.approx(np.mean(expected_ssim), abs=5e-4)

    identical = evaluate_folders(tmp_path / "same", tmp_path / "hq", **quiet(metrics="psnr,ssim", device="cpu"))
    assert all(s["psnr"] >= 60.0 for s in identical.per_image)  # pyiqa's epsilon caps it at 80 dB; inf is fine too
    assert all(s["ssim"] == pytest.approx(1.0, abs=1e-9) for s in identical.per_image)


# ---------------------------------------------------------------- library missing


def test_missing_library_gives_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` raise ImportError
    with pytest.raises(MetricUnavailableError, match=r"pip install 'comfyui-fidesr\[eval\]'"):
        MetricSuite(["psnr"])
    touch_images(tmp_path / "sr", ["0001.png"])
    touch_images(tmp_path / "hq", ["0001.png"])
    assert main(["--sr", str(tmp_path / "sr"), "--hq", str(tmp_path / "hq"), "--no-progress"]) == 2
    assert "pip install 'comfyui-fidesr[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "sr_metrics.csv").exists()


def test_module_imports_without_the_library() -> None:
    script = (
        "import sys; sys.modules['pyiqa'] = None\n"
        "import training.evaluate, training.metrics\n"
        "assert 'pyiqa' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "training.evaluate.build_parser().format_help()\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_pkg_resources_stand_in_for_openai_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = sys.modules.pop("pkg_resources", None)
    real_find_spec = metrics_module.importlib.util.find_spec
    monkeypatch.setattr(
        metrics_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "pkg_resources" else real_find_spec(name, *args),
    )
    try:
        metrics_module._provide_pkg_resources_packaging()
        from pkg_resources import packaging  # what openai-clip does

        assert packaging.version.parse("2.14.1") > packaging.version.parse("1.7.1")
    finally:
        sys.modules.pop("pkg_resources", None)
        if saved is not None:
            sys.modules["pkg_resources"] = saved
