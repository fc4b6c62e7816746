"""Step-level parity of the FiDeSR-specific modules: each equals the independent reference of the released code (docs/algorithm.md §3–4).

LRRB, Butterworth filters, detail map, LFIM gates and branches.  Float32 on the CPU;
the reference lives in ``reference_impl.py`` and never calls the engine.  Tolerances
are float32 round-off, not behavioural slack.  The image steps around the network
(tiling, colour fix, pre-processing) are in ``test_parity_image_steps.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity_helpers import assert_matches_reference as _close
from parity_helpers import smooth_image as _smooth_image
from reference_impl import (
    LRRB_PARAMETER_SHAPES,
    ref_butterworth_lowpass_mask,
    ref_channel_gate,
    ref_conv3_replicate,
    ref_detail_map,
    ref_highpass,
    ref_lfim,
    ref_lowpass,
    ref_lrrb,
    ref_percentile_normalize,
    ref_spatial_gate,
)

from fidesr_core.networks.lrrb import LRRB
from fidesr_core.ops.detail_map import (
    box_blur3,
    detail_map,
    exact_quantile,
    laplacian_magnitude,
    local_variance,
    luminance,
    percentile_normalize,
    sobel_magnitude,
)
from fidesr_core.ops.frequency import butterworth_highpass, butterworth_lowpass, butterworth_lowpass_mask
from fidesr_core.ops.injection import (
    HighFrequencySettings,
    LowFrequencySettings,
    channel_gate,
    high_frequency_delta,
    inject_frequencies,
    low_frequency_delta,
    spatial_gate,
)

# ------------------------------------------------------------------------- LRRB


def test_lrrb_state_dict_names_shapes_and_parameter_count() -> None:
    lrrb = LRRB()
    shapes = {name: tuple(t.shape) for name, t in lrrb.state_dict().items()}
    assert shapes == LRRB_PARAMETER_SHAPES
    assert sum(p.numel() for p in lrrb.parameters()) == 720_260
    assert sum(int(np.prod(s)) for s in LRRB_PARAMETER_SHAPES.values()) == 720_260


def test_untrained_lrrb_returns_exact_zero() -> None:
    torch.manual_seed(0)
    out = LRRB()(torch.randn(2, 8, 12, 20) * 5)
    assert out.shape == (2, 4, 12, 20)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("size", [(1, 1), (9, 14), (24, 40)])
def test_lrrb_forward_matches_reference(size: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(1)
    state = {name: 0.05 * torch.randn(shape, generator=generator) for name, shape in LRRB_PARAMETER_SHAPES.items()}
    lrrb = LRRB()
    lrrb.load_state_dict(state, strict=True)
    x = torch.randn(2, 8, *size, generator=generator)
    with torch.no_grad():
        _close(lrrb(x), ref_lrrb(state, x))


# ------------------------------------------------------------ Butterworth filters


FILTER_SIZES = [(1, 1), (1, 8), (8, 1), (2, 3), (7, 13), (12, 12), (24, 40), (33, 17)]


@pytest.mark.parametrize("size", FILTER_SIZES)
@pytest.mark.parametrize(("cutoff", "order"), [(0.10, 2), (0.32, 2), (0.5, 3)])
def test_butterworth_mask_official_geometry(size: tuple[int, int], cutoff: float, order: int) -> None:
    mask = butterworth_lowpass_mask(*size, cutoff=cutoff, order=order, geometry="official")
    _close(mask, ref_butterworth_lowpass_mask(*size, cutoff, order), atol=1e-6, rtol=1e-6)


def test_butterworth_mask_is_not_wrapped() -> None:
    """Row H−1 is the highest vertical frequency in the released filter (not a low negative one)."""
    mask = butterworth_lowpass_mask(16, 16, cutoff=0.1, order=2, geometry="official")
    assert mask[0, 0] == pytest.approx(1.0)
    assert mask[-1, 0] < 0.05 < mask[1, 0]
    assert mask[-1, 0] < mask[-2, 0] < mask[1, 0]


@pytest.mark.parametrize("size", FILTER_SIZES)
def test_lowpass_and_highpass_match_reference(size: tuple[int, int]) -> None:
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(2))
    for cutoff in (0.10, 0.32):
        _close(butterworth_lowpass(x, cutoff=cutoff, order=2), ref_lowpass(x, cutoff, 2))
        _close(butterworth_highpass(x, cutoff=cutoff, order=2), ref_highpass(x, cutoff, 2))


# --------------------------------------------------------------------- detail map


def test_detail_map_components_match_reference() -> None:
    image = _smooth_image(2, 20, 28, seed=3)
    gray_ref = (0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]).float()
    _close(luminance(image), gray_ref)
    sobel_x = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
    sobel_y = [list(row) for row in zip(*sobel_x, strict=True)]
    gx = ref_conv3_replicate(gray_ref, sobel_x)
    gy = ref_conv3_replicate(gray_ref, sobel_y)
    _close(sobel_magnitude(gray_ref), torch.sqrt(gx**2 + gy**2))
    lap = ref_conv3_replicate(gray_ref, [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).abs()
    _close(laplacian_magnitude(gray_ref), lap)
    box = [[1 / 9] * 3] * 3
    _close(box_blur3(gray_ref), ref_conv3_replicate(gray_ref, box))
    _close(local_variance(gray_ref), ref_conv3_replicate((gray_ref - ref_conv3_replicate(gray_ref, box)) ** 2, box))


@pytest.mark.parametrize("shift_to_unit", [True, False])
@pytest.mark.parametrize("size", [(3, 3), (17, 23), (64, 96)])
def test_detail_map_matches_reference(size: tuple[int, int], shift_to_unit: bool) -> None:
    image = _smooth_image(2, *size, seed=4)
    _close(detail_map(image, shift_to_unit=shift_to_unit), ref_detail_map(image, shift_to_unit=shift_to_unit))


def test_detail_map_statistics_are_per_image() -> None:
    """Image 0 of a batch gets the same map alone as next to a very different image."""
    image = _smooth_image(1, 24, 24, seed=5)
    flat = torch.full_like(image, 0.3)
    loud = torch.randn_like(image).clamp(-1, 1)
    alone = detail_map(image)
    _close(detail_map(torch.cat([image, loud]))[0:1], alone)
    assert torch.isfinite(detail_map(torch.cat([image, flat]))).all()


def test_percentile_normalize_matches_reference() -> None:
    x = torch.randn(3, 1, 11, 17, generator=torch.Generator().manual_seed(6)) ** 3
    _close(percentile_normalize(x), ref_percentile_normalize(x))
    x4 = torch.rand(2, 4, 5, 6, generator=torch.Generator().manual_seed(7))
    _close(percentile_normalize(x4), ref_percentile_normalize(x4))


@pytest.mark.parametrize("numel", [1, 2, 3, 10, 101, 4096])
@pytest.mark.parametrize("q", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_exact_quantile_equals_torch_quantile(numel: int, q: float) -> None:
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    expected = torch.quantile(values, q)
    torch.testing.assert_close(exact_quantile(values, q).reshape(()), expected, atol=0, rtol=1e-6)
    with_ties = torch.round(values * 2) / 2  # many equal values
    torch.testing.assert_close(
        exact_quantile(with_ties, q).reshape(()), torch.quantile(with_ties, q), atol=0, rtol=1e-6
    )


def test_exact_quantile_beyond_torch_quantile_limit() -> None:
    """A 4100x4100 map (16.8M values > 2**24): exact against numpy's float64 linear quantile."""
    side = 4100
    assert side * side > 2**24
    generator = torch.Generator().manual_seed(8)
    values = torch.rand(1, 1, side, side, generator=generator) ** 2
    as_numpy = values.reshape(-1).double().numpy()
    low, high = (float(v) for v in np.quantile(as_numpy, [0.05, 0.95], method="linear"))
    assert float(exact_quantile(values, 0.05)) == pytest.approx(low, rel=1e-6, abs=1e-7)
    assert float(exact_quantile(values, 0.95)) == pytest.approx(high, rel=1e-6, abs=1e-7)
    # pnorm on the whole map: same formula with those quantiles, values clamped to [0, 1].
    normalised = percentile_normalize(values)
    sample = values.reshape(-1)[::9973]
    expected_sample = ((sample - low) / (high - low + 1e-6)).clamp(0, 1)
    torch.testing.assert_close(normalised.reshape(-1)[::9973], expected_sample, atol=2e-6, rtol=0)
    inside = (values > low) & (values < high)
    assert abs(float(inside.float().mean()) - 0.9) < 1e-3


# ---------------------------------------------------------------------- LFIM gates


@pytest.mark.parametrize(("image_size", "latent_size"), [((64, 96), (8, 12)), ((60, 44), (9, 5)), ((8, 8), (1, 1))])
def test_spatial_gate_matches_reference(image_size: tuple[int, int], latent_size: tuple[int, int]) -> None:
    image = _smooth_image(2, *image_size, seed=9)
    _close(spatial_gate(image, latent_size), ref_spatial_gate(image, latent_size))


@pytest.mark.parametrize(("cutoff", "order", "tau", "sharp"), [(0.10, 2, 0.8, 10.0), (0.3, 3, 0.5, 8.0)])
def test_channel_gate_matches_reference(cutoff: float, order: int, tau: float, sharp: float) -> None:
    generator = torch.Generator().manual_seed(10)
    smooth = F.interpolate(torch.randn(2, 4, 3, 5, generator=generator), size=(24, 40), mode="bilinear")
    z_lq = smooth + 0.3 * torch.randn(2, 4, 24, 40, generator=generator)
    z_lq[1, 2] = 0.0  # an all-zero channel: the norms' 1e-6 floor keeps the gate finite
    gate = channel_gate(z_lq, cutoff=cutoff, order=order, tau=tau, sharpness=sharp)
    assert gate.shape == (2, 4, 1, 1)
    _close(gate, ref_channel_gate(z_lq, cutoff, order, tau, sharp))


# ---------------------------------------------------------------- LFIM branches


LATENT = (16, 24)


def _lfim_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z_lq = F.interpolate(torch.randn(2, 4, 4, 6, generator=generator), size=LATENT, mode="bicubic")
    z_lq = z_lq + 0.5 * torch.randn(2, 4, *LATENT, generator=generator)
    refined = 0.3 * torch.randn(2, 4, *LATENT, generator=generator)
    image = _smooth_image(2, 8 * LATENT[0], 8 * LATENT[1], seed=seed + 100)
    return z_lq, refined, z_lq - refined, image


def _branch_settings(**overrides: float) -> tuple[LowFrequencySettings, HighFrequencySettings]:
    """Engine settings at the released test-script defaults (optionally changed on both channel gates alike)."""
    lf = {"cutoff": 0.10, "order": 2, "channel_tau": 0.8, "channel_sharpness": 10.0, "gamma": 1.2}
    hf = {"cutoff": 0.32, "order": 2, "gamma": 1.2}
    lf.update({k[3:]: v for k, v in overrides.items() if k.startswith("lf_") and k != "lf_strength"})
    hf.update({k[3:]: v for k, v in overrides.items() if k.startswith("hf_") and k != "hf_strength"})
    low = LowFrequencySettings(strength=float(overrides.get("lf_strength", 0.0)), **lf)
    high = HighFrequencySettings(
        strength=float(overrides.get("hf_strength", 0.0)),
        channel_cutoff=lf["cutoff"],
        channel_order=lf["order"],
        channel_tau=lf["channel_tau"],
        channel_sharpness=lf["channel_sharpness"],
        **hf,
    )
    return low, high


@pytest.mark.parametrize("strength", [0.1, 0.5])
def test_low_frequency_branch_matches_reference(strength: float) -> None:
    z_lq, refined, z, image = _lfim_inputs(seed=11)
    gate = spatial_gate(image, LATENT)
    low, _ = _branch_settings(lf_strength=strength)
    expected = ref_lfim(z, z_lq, refined, image, lf_scale=strength, hf_scale=0.0) - z
    _close(low_frequency_delta(z, z_lq, gate, low), expected)


@pytest.mark.parametrize("strength", [0.1, 0.5])
def test_high_frequency_branch_matches_reference(strength: float) -> None:
    z_lq, refined, z, image = _lfim_inputs(seed=12)
    gate = spatial_gate(image, LATENT)
    _, high = _branch_settings(hf_strength=strength)
    expected = ref_lfim(z, z_lq, refined, image, lf_scale=0.0, hf_scale=strength) - z
    _close(high_frequency_delta(z, z_lq, gate, high), expected)


def test_branches_with_non_default_settings_match_reference() -> None:
    z_lq, refined, z, image = _lfim_inputs(seed=13)
    gate = spatial_gate(image, LATENT)
    low, high = _branch_settings(
        lf_strength=0.3, hf_strength=0.4, lf_cutoff=0.25, lf_order=3, lf_channel_tau=0.6, lf_channel_sharpness=6.0
    )
    low = LowFrequencySettings(**{**low.__dict__, "gamma": 1.5})
    high = HighFrequencySettings(**{**high.__dict__, "cutoff": 0.2, "gamma": 0.8})
    common = {
        "lf_rc": 0.25,
        "lf_order": 3,
        "lf_tau": 0.6,
        "lf_sharp": 6.0,
        "lf_gamma": 1.5,
        "hf_rc": 0.2,
        "hf_gamma": 0.8,
    }
    expected_lf = ref_lfim(z, z_lq, refined, image, lf_scale=0.3, hf_scale=0.0, **common) - z
    expected_hf = ref_lfim(z, z_lq, refined, image, lf_scale=0.0, hf_scale=0.4, **common) - z
    _close(low_frequency_delta(z, z_lq, gate, low), expected_lf)
    _close(high_frequency_delta(z, z_lq, gate, high), expected_hf)


@pytest.mark.parametrize(("released_lf", "released_hf"), [(0.2, 0.2), (0.2, 0.3), (0.4, 0.0), (0.0, 0.3), (0.0, 0.0)])
def test_merge_semantics_match_released(released_lf: float, released_hf: float) -> None:
    """Released (lf=s, hf=t, both on, m=0.5) == engine (s/2, t/2); one branch on keeps its scale."""
    z_lq, refined, z, image = _lfim_inputs(seed=14)
    gate = spatial_gate(image, LATENT)
    both = released_lf > 0 and released_hf > 0
    factor = 0.5 if both else 1.0
    low, high = _branch_settings(lf_strength=factor * released_lf, hf_strength=factor * released_hf)
    if released_lf == 0 and released_hf == 0:
        expected = z
    else:
        expected = ref_lfim(z, z_lq, refined, image, lf_scale=released_lf, hf_scale=released_hf)
    _close(inject_frequencies(z, z_lq, gate, low, high), expected)


def test_branches_commute_and_add() -> None:
    z_lq, refined, z, image = _lfim_inputs(seed=15)
    gate = spatial_gate(image, LATENT)
    low, high = _branch_settings(lf_strength=0.1, hf_strength=0.1)
    total = inject_frequencies(z, z_lq, gate, low, high)
    lf_delta = low_frequency_delta(z, z_lq, gate, low)
    hf_delta = high_frequency_delta(z, z_lq, gate, high)
    _close(total, z + lf_delta + hf_delta)
    _close(total, z + hf_delta + lf_delta)
    assert float(lf_delta.abs().max()) > 1e-4 and float(hf_delta.abs().max()) > 1e-4
