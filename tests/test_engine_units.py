"""Unit behaviour of the engine's latent-space helpers that the parity tests do not pin down.

Latent tiling, frequency filters, detail map and injection: edge cases, validation,
invariants (symmetries, identities, degenerate inputs) and the plumbing around the
numerics (progress, cancellation).  Colour fix, pre-processing and the model-backed
steps are in ``test_engine_pipeline_steps.py``.
"""

from __future__ import annotations

import pytest
import torch

from fidesr_core.errors import Cancelled, SettingsError
from fidesr_core.ops.detail_map import detail_map, exact_quantile, percentile_normalize
from fidesr_core.ops.frequency import (
    butterworth_highpass,
    butterworth_lowpass,
    butterworth_lowpass_mask,
    frequency_radius,
)
from fidesr_core.ops.injection import (
    HighFrequencySettings,
    LowFrequencySettings,
    channel_gate,
    high_frequency_delta,
    inject_frequencies,
    low_frequency_delta,
    residual_magnitude_map,
    spatial_gate,
)
from fidesr_core.ops.latent_tiling import gaussian_tile_weight, needs_tiling, run_tiled, tile_starts
from fidesr_core.settings import UpscaleSettings

# ------------------------------------------------------------------- latent tiling


def test_tile_starts_single_tile_and_coverage() -> None:
    assert tile_starts(50, 96, 32) == [0]
    assert tile_starts(96, 96, 32) == [0]
    for length in range(97, 400, 7):
        starts = tile_starts(length, 96, 32)
        assert starts == sorted(set(starts))
        assert all(b - a <= 64 for a, b in zip(starts, starts[1:], strict=False))  # overlap ≥ 32 everywhere
        covered = torch.zeros(length, dtype=torch.bool)
        for start in starts:
            covered[start : start + 96] = True
        assert covered.all()


def test_tile_overlap_must_be_smaller_than_tile() -> None:
    with pytest.raises(SettingsError, match="^tile_overlap must be smaller than tile_size"):
        UpscaleSettings(tile_size=96, tile_overlap=96)
    UpscaleSettings(tile_size=0, tile_overlap=96)  # tiling off: overlap irrelevant


def test_needs_tiling_is_the_released_area_rule() -> None:
    assert not needs_tiling(96, 96, 96)
    assert needs_tiling(96, 97, 96)
    assert needs_tiling(64, 145, 96)  # 9280 > 9216 although both sides fit in the area of one tile
    assert not needs_tiling(1000, 1000, 0)


def test_gaussian_tile_weight_symmetry_and_positivity() -> None:
    for height, width in [(96, 96), (64, 96), (7, 5), (1, 1)]:
        weight = gaussian_tile_weight(height, width)
        assert weight.dtype == torch.float32
        assert (weight > 0).all()
        torch.testing.assert_close(weight, weight.flip(0))
        torch.testing.assert_close(weight, weight.flip(1))
        assert float(weight.max()) <= 1.0
    assert float(gaussian_tile_weight(7, 9)[3, 4]) == 1.0  # odd sizes have a pixel at the centre


def test_run_tiled_without_tiling_calls_fn_once_on_whole_input() -> None:
    calls = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t.half()

    x = torch.randn(2, 4, 96, 96)
    out = run_tiled(fn, x, tile_size=96, overlap=32)
    assert calls == [(2, 4, 96, 96)]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.half().float())
    run_tiled(fn, torch.randn(1, 4, 200, 200), tile_size=0, overlap=32)
    assert calls[-1] == (1, 4, 200, 200)


def test_run_tiled_progress_cancel_and_channel_change() -> None:
    reports = []
    x = torch.randn(1, 4, 30, 50)
    out = run_tiled(lambda t: t[:, :3] * 2, x, tile_size=16, overlap=6, progress=lambda d, n: reports.append((d, n)))
    assert out.shape == (1, 3, 30, 50)
    torch.testing.assert_close(out, x[:, :3] * 2)
    total = len(tile_starts(30, 16, 6)) * len(tile_starts(50, 16, 6))
    assert reports == [(i, total) for i in range(1, total + 1)]
    with pytest.raises(Cancelled):
        run_tiled(lambda t: t, x, tile_size=16, overlap=6, should_cancel=lambda: True)


# ------------------------------------------------------------ frequency filters


@pytest.mark.parametrize("geometry", ["official", "radial"])
def test_lowpass_plus_highpass_is_identity_and_dc_passes(geometry: str) -> None:
    x = torch.randn(2, 4, 13, 20)
    low = butterworth_lowpass(x, cutoff=0.2, order=2, geometry=geometry)
    high = butterworth_highpass(x, cutoff=0.2, order=2, geometry=geometry)
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=1e-5)
    constant = torch.full((1, 1, 9, 12), 0.7)
    torch.testing.assert_close(butterworth_lowpass(constant, cutoff=0.05, geometry=geometry), constant)
    assert float(butterworth_highpass(constant, cutoff=0.05, geometry=geometry).abs().max()) < 1e-6


@pytest.mark.parametrize("geometry", ["official", "radial"])
def test_frequency_radius_range(geometry: str) -> None:
    for height, width in [(1, 1), (2, 2), (7, 13), (64, 96)]:
        radius = frequency_radius(height, width, geometry=geometry)
        assert radius.shape == (height, width // 2 + 1)
        assert float(radius[0, 0]) == 0.0
        assert float(radius.min()) >= 0.0 and float(radius.max()) <= 1.0 + 1e-7


def test_radial_geometry_is_symmetric_and_official_is_not() -> None:
    radial = butterworth_lowpass_mask(16, 16, cutoff=0.3, order=2, geometry="radial")
    for k in range(1, 16):
        torch.testing.assert_close(radial[k], radial[16 - k])
    torch.testing.assert_close(radial[:9, :9], radial[:9, :9].T)
    official = butterworth_lowpass_mask(16, 16, cutoff=0.3, order=2, geometry="official")
    assert not torch.allclose(official[1], official[15])
    image = torch.randn(1, 1, 16, 16)
    flipped = butterworth_lowpass(image.transpose(-1, -2), cutoff=0.3, geometry="radial")
    torch.testing.assert_close(flipped, butterworth_lowpass(image, cutoff=0.3, geometry="radial").transpose(-1, -2))


def test_filter_settings_are_checked_and_filters_return_float32() -> None:
    with pytest.raises(SettingsError, match="^lf.cutoff must be"):
        LowFrequencySettings(cutoff=0.0)
    with pytest.raises(SettingsError, match="^hf.order must be"):
        HighFrequencySettings(order=0)
    with pytest.raises(SettingsError, match="^lf.filter must be one of official, radial"):
        LowFrequencySettings(filter="square")  # type: ignore[arg-type]
    assert butterworth_lowpass(torch.randn(1, 4, 8, 8).half(), cutoff=0.1).dtype == torch.float32


# --------------------------------------------------------------- detail map


def test_detail_map_of_flat_image_is_zero_and_finite() -> None:
    flat = torch.full((2, 3, 16, 24), -0.2)
    detail = detail_map(flat)
    assert detail.shape == (2, 1, 16, 24)
    assert torch.equal(detail, torch.zeros_like(detail))


def test_detail_map_range_and_flip_equivariance() -> None:
    image = torch.rand(1, 3, 20, 30) * 2 - 1
    detail = detail_map(image)
    assert float(detail.min()) >= 0.0 and float(detail.max()) <= 1.0
    for dims in ([-1], [-2], [-1, -2]):
        torch.testing.assert_close(detail_map(image.flip(dims)), detail.flip(dims), atol=1e-5, rtol=1e-5)


def test_detail_map_is_high_on_edges() -> None:
    image = torch.full((1, 3, 32, 32), -1.0)
    image[..., 16:] = 1.0  # one vertical edge
    detail = detail_map(image)
    assert float(detail[0, 0, :, 15:17].min()) > 0.5
    assert torch.equal(detail[0, 0, :, 15:17].amin(dim=1), detail[0, 0].amax(dim=1))  # the edge is the maximum
    assert float(detail[0, 0, :, :13].max()) == 0.0 and float(detail[0, 0, :, 19:].max()) == 0.0


def test_exact_quantile_edge_cases() -> None:
    values = torch.tensor([3.0, -1.0, 7.0, 2.0])
    assert float(exact_quantile(values, 0.0)) == -1.0
    assert float(exact_quantile(values, 1.0)) == 7.0
    assert float(exact_quantile(values, 0.5)) == pytest.approx(2.5)
    assert float(exact_quantile(torch.tensor([5.0]), 0.95)) == 5.0
    assert float(exact_quantile(values.half().view(2, 2), 1.0)) == 7.0
    with pytest.raises(ValueError):
        exact_quantile(torch.tensor([]), 0.5)


def test_percentile_normalize_constant_and_saturation() -> None:
    constant = torch.full((2, 1, 4, 4), 3.0)
    assert torch.equal(percentile_normalize(constant), torch.zeros_like(constant))
    ramp = torch.arange(100.0).view(1, 1, 10, 10)
    normalised = percentile_normalize(ramp)
    assert float(normalised.min()) == 0.0 and float(normalised.max()) == 1.0
    assert (normalised.view(-1)[:5] == 0).all() and (normalised.view(-1)[-4:] == 1).all()


# ----------------------------------------------------------------- injection


def test_injection_settings_validation() -> None:
    for bad in ({"cutoff": 0.0}, {"cutoff": 1.5}, {"order": 0}, {"gamma": 0.0}, {"filter": "square"}):
        with pytest.raises(SettingsError):
            LowFrequencySettings(**bad)  # type: ignore[arg-type]
        with pytest.raises(SettingsError):
            HighFrequencySettings(**bad)  # type: ignore[arg-type]
    with pytest.raises(SettingsError):
        HighFrequencySettings(channel_cutoff=0.0)


def _latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z_lq = torch.randn(2, 4, 12, 16, generator=generator)
    z = z_lq - 0.2 * torch.randn(2, 4, 12, 16, generator=generator)
    gate = torch.rand(2, 1, 12, 16, generator=generator)
    return z, z_lq, gate


def test_zero_strength_leaves_latent_exactly() -> None:
    z, z_lq, gate = _latents()
    off_low, off_high = LowFrequencySettings(strength=0.0), HighFrequencySettings(strength=0.0)
    assert torch.equal(inject_frequencies(z, z_lq, gate, off_low, off_high), z)
    assert torch.equal(low_frequency_delta(z, z_lq, gate, off_low), torch.zeros_like(z))


def test_no_restoration_means_no_injection() -> None:
    """z == z_L (zero residual): ΔHP vanishes and the LF mask pnorm(0) is 0, so both deltas are 0."""
    _, z_lq, gate = _latents()
    low, high = LowFrequencySettings(strength=1.0), HighFrequencySettings(strength=1.0)
    assert float(low_frequency_delta(z_lq, z_lq, gate, low).abs().max()) == 0.0
    assert float(high_frequency_delta(z_lq, z_lq, gate, high).abs().max()) < 1e-6


def test_deltas_scale_linearly_with_strength() -> None:
    z, z_lq, gate = _latents(1)
    for delta, settings in ((low_frequency_delta, LowFrequencySettings), (high_frequency_delta, HighFrequencySettings)):
        one = delta(z, z_lq, gate, settings(strength=0.1))
        three = delta(z, z_lq, gate, settings(strength=0.3))
        torch.testing.assert_close(three, 3 * one, atol=1e-6, rtol=1e-5)
        negative = delta(z, z_lq, gate, settings(strength=-0.1))
        torch.testing.assert_close(negative, -one)


def test_hf_delta_is_gated_by_spatial_map() -> None:
    z, z_lq, _ = _latents(2)
    gate = torch.zeros(2, 1, 12, 16)
    gate[..., :, 8:] = 1.0
    delta = high_frequency_delta(z, z_lq, gate, HighFrequencySettings(strength=1.0))
    assert float(delta[..., :8].abs().max()) == 0.0
    assert float(delta[..., 8:].abs().max()) > 1e-3


def test_radial_filter_changes_the_deltas() -> None:
    z, z_lq, gate = _latents(3)
    official = low_frequency_delta(z, z_lq, gate, LowFrequencySettings(strength=1.0))
    radial = low_frequency_delta(z, z_lq, gate, LowFrequencySettings(strength=1.0, filter="radial"))
    assert torch.isfinite(radial).all()
    assert float((official - radial).abs().max()) > 1e-4


def test_channel_gate_orders_smooth_above_busy_channels() -> None:
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = 1.0 + 0.1 * torch.cos(xx / 16 * torch.pi)
    checker = (-1.0) ** (yy + xx)
    z_lq = torch.stack([smooth, checker, torch.zeros(16, 16), smooth + 0.5 * checker])[None]
    gate = channel_gate(z_lq, cutoff=0.1, order=2, tau=0.8, sharpness=10.0)
    assert gate.shape == (1, 4, 1, 1)
    values = gate.view(-1)
    assert values[0] > values[3] > values[1]
    assert float(values[0]) == pytest.approx(torch.sigmoid(torch.tensor(10.0 * 0.2)).item(), abs=0.02)
    assert torch.isfinite(values).all()  # the all-zero channel


def test_residual_magnitude_map_shape_range() -> None:
    refined = torch.randn(2, 4, 10, 12)
    residual_map = residual_magnitude_map(refined)
    assert residual_map.shape == (2, 1, 10, 12)
    assert float(residual_map.min()) == 0.0 and float(residual_map.max()) == 1.0


def test_spatial_gate_shape_and_range() -> None:
    gate = spatial_gate(torch.rand(2, 3, 64, 40) * 2 - 1, (8, 5))
    assert gate.shape == (2, 1, 8, 5)
    assert float(gate.min()) >= 0.0 and float(gate.max()) <= 1.0
