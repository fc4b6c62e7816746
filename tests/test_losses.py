"""Tests of the FiDeSR training losses: DAW weights, weighted L2/LPIPS, LPIPS net, CSD, FiDeSRLoss.

Everything runs on CPU with a random-trunk LPIPS and a tiny random U-Net; nothing is downloaded.
Reference values are computed here by the formulas of docs/algorithm.md §5 with independent code
(numpy loops for the 3x3 filters and quantiles, direct U-Net calls for CSD).
"""

from __future__ import annotations

import copy
import math
import socket
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from fidesr_core.errors import SettingsError
from fidesr_core.networks.lora import add_lora_adapters, lora_target_modules
from fidesr_core.networks.tiny import TINY_UNET_CONFIG
from training.csd import NEGATIVE_PROMPT, ClassifierScoreDistillation, ddpm_alphas_cumprod, frozen_unet
from training.losses import FiDeSRLoss, WeightedL2Loss, WeightedLPIPSLoss, daw_alpha, daw_weights
from training.lpips_net import LPIPSNet

# ---------------------------------------------------------------------------------------------- helpers


class DownloadAttempted(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise DownloadAttempted(f"download attempted: {args[:1]}")


@contextmanager
def no_downloads():
    """Make every torch / torchvision weight download and every socket connection raise."""
    import torch.hub
    import torchvision._internally_replaced_utils as tv_utils
    import torchvision.models._api as tv_api

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
        patch.setattr(torch.hub, "download_url_to_file", _refuse)
        patch.setattr(tv_api, "load_state_dict_from_url", _refuse)
        patch.setattr(tv_utils, "load_state_dict_from_url", _refuse)
        patch.setattr(socket.socket, "connect", _refuse)
        yield


@pytest.fixture(scope="module")
def lpips_net() -> LPIPSNet:
    with no_downloads():
        return LPIPSNet(pretrained=False)


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def _images(batch: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hq = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    sr = (hq + 0.3 * torch.randn(batch, 3, height, width, generator=generator)).clamp(-1, 1)
    return sr, hq


def _embeddings(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 32, generator=generator), torch.randn(1, 77, 32, generator=generator)


# numpy references (float64, explicit loops)


def _np_filter3(image: np.ndarray, kernel: list[list[float]]) -> np.ndarray:
    height, width = image.shape
    out = np.zeros_like(image)
    for i in range(height):
        for j in range(width):
            total = 0.0
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii = min(max(i + di, 0), height - 1)
                    jj = min(max(j + dj, 0), width - 1)
                    total += kernel[di + 1][dj + 1] * image[ii, jj]
            out[i, j] = total
    return out


def _np_quantile(values: np.ndarray, q: float) -> float:
    ordered = sorted(values.ravel().tolist())
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _np_pnorm(x: np.ndarray) -> np.ndarray:
    q05, q95 = _np_quantile(x, 0.05), _np_quantile(x, 0.95)
    return np.clip((x - q05) / (q95 - q05 + 1e-6), 0.0, 1.0)


BOX = [[1 / 9] * 3] * 3
SOBEL_X = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
SOBEL_Y = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]
LAPLACIAN = [[0, 1, 0], [1, -4, 1], [0, 1, 0]]


def _np_daw(sr: np.ndarray, hq: np.ndarray, lp: np.ndarray, alpha: float, w_max: float, mix: float) -> np.ndarray:
    """docs/algorithm.md §5 DAW for one image: sr, hq [3, H, W]; lp [H, W]."""
    gray = 0.299 * hq[0] + 0.587 * hq[1] + 0.114 * hq[2]  # on [-1, 1] values, no shift
    sobel = np.sqrt(_np_filter3(gray, SOBEL_X) ** 2 + _np_filter3(gray, SOBEL_Y) ** 2)
    laplacian = np.abs(_np_filter3(gray, LAPLACIAN))
    variance = _np_filter3((gray - _np_filter3(gray, BOX)) ** 2, BOX)
    detail = _np_filter3(_np_pnorm((sobel + laplacian + variance) / 3), BOX)
    abs_error = np.abs(sr - hq)
    pixel = 0.8 * abs_error.mean(axis=0) + 0.2 * abs_error.std(axis=0, ddof=1)
    error = _np_pnorm((1 - mix) * pixel + mix * lp)
    blurred = _np_filter3(detail * error, BOX)
    relative = blurred / (blurred.mean() + 1e-6)
    weights = 1 + alpha * w_max * np.tanh(relative / w_max)
    return weights / weights.mean()


# ---------------------------------------------------------------------------------------------- DAW


def test_daw_alpha_schedule() -> None:
    assert daw_alpha(0) == 0.0
    assert daw_alpha(1999) == 0.0
    assert daw_alpha(2000) == 0.0
    assert daw_alpha(2250) == pytest.approx(0.15)
    assert daw_alpha(2500) == pytest.approx(0.3)
    assert daw_alpha(3000) == pytest.approx(0.6)
    assert daw_alpha(200_000) == pytest.approx(0.6)
    assert daw_alpha(15, start=10, ramp=10, alpha=1.0) == pytest.approx(0.5)
    assert daw_alpha(9, start=10, ramp=0, alpha=0.4) == 0.0
    assert daw_alpha(10, start=10, ramp=0, alpha=0.4) == pytest.approx(0.4)


def test_daw_weights_shape_mean_and_no_grad() -> None:
    sr, hq = _images(2, 16, 20, seed=1)
    sr.requires_grad_(True)
    lpips_map = torch.rand(2, 1, 16, 20, generator=torch.Generator().manual_seed(2))
    weights = daw_weights(sr, hq, lpips_map, alpha=0.6)
    assert weights.shape == (2, 1, 16, 20)
    assert not weights.requires_grad
    assert torch.allclose(weights.mean(dim=(2, 3)), torch.ones(2, 1), atol=1e-5)
    assert weights.std() > 0.01  # not trivially uniform
    assert weights.min() > 0


def test_daw_weights_alpha_zero_is_exactly_one() -> None:
    sr, hq = _images(2, 12, 12, seed=3)
    weights = daw_weights(sr, hq, torch.rand(2, 1, 12, 12), alpha=0.0)
    assert torch.equal(weights, torch.ones(2, 1, 12, 12))


def test_daw_weights_favour_detailed_high_error_region() -> None:
    height, width = 16, 32
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    checker = ((rows + cols) % 2).float() * 1.6 - 0.8
    hq = torch.where(cols < width // 2, torch.zeros(height, width), checker).expand(1, 3, height, width).clone()
    error = torch.zeros_like(hq)
    error[..., width // 2 :] = 0.4 * torch.randn(1, 3, height, width // 2, generator=torch.Generator().manual_seed(4))
    sr = hq + error
    lpips_map = error.abs().mean(dim=1, keepdim=True)
    weights = daw_weights(sr, hq, lpips_map, alpha=0.6)
    flat_low_error = weights[..., 2 : width // 2 - 2].mean()
    detailed_high_error = weights[..., width // 2 + 2 : -2].mean()
    assert detailed_high_error > flat_low_error + 0.3


@pytest.mark.parametrize(("alpha", "w_max", "mix"), [(0.45, 2.0, 0.5), (0.6, 1.5, 0.3)])
def test_daw_weights_match_hand_computation(alpha: float, w_max: float, mix: float) -> None:
    sr, hq = _images(2, 7, 9, seed=5)
    lpips_map = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(6))
    weights = daw_weights(sr, hq, lpips_map, alpha=alpha, w_max=w_max, perceptual_mix=mix)
    for index in range(2):
        expected = _np_daw(
            sr[index].double().numpy(),
            hq[index].double().numpy(),
            lpips_map[index, 0].double().numpy(),
            alpha,
            w_max,
            mix,
        )
        np.testing.assert_allclose(weights[index, 0].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_daw_weights_reject_bad_settings() -> None:
    sr, hq = _images(1, 8, 8, seed=7)
    with pytest.raises(SettingsError):
        daw_weights(sr, hq, torch.rand(1, 1, 8, 8), w_max=0.0)
    with pytest.raises(ValueError):
        daw_weights(sr, hq[..., :4], torch.rand(1, 1, 8, 8))


# ---------------------------------------------------------------------------------------------- weighted losses


def test_weighted_l2_with_unit_weights_is_mse_and_weights_apply() -> None:
    sr, hq = _images(2, 8, 10, seed=8)
    loss = WeightedL2Loss()
    assert torch.allclose(loss(sr, hq, torch.ones(2, 1, 8, 10)), F.mse_loss(sr, hq))
    assert torch.allclose(loss(sr, hq), F.mse_loss(sr, hq))
    weights = torch.zeros(2, 1, 8, 10)
    weights[..., :5] = 2.0  # left half doubled, right half ignored
    expected = ((sr - hq) ** 2)[..., :5].sum() * 2.0 / sr.numel()
    assert torch.allclose(loss(sr, hq, weights), expected)
    with pytest.raises(ValueError):
        loss(sr, hq, torch.ones(2, 1, 4, 5))


def test_weighted_lpips_with_unit_weights_is_mean() -> None:
    lpips_map = torch.rand(2, 1, 8, 10, generator=torch.Generator().manual_seed(9))
    loss = WeightedLPIPSLoss()
    assert torch.allclose(loss(lpips_map, torch.ones(2, 1, 8, 10)), lpips_map.mean())
    assert torch.allclose(loss(lpips_map), lpips_map.mean())
    weights = torch.zeros(2, 1, 8, 10)
    weights[..., :5] = 2.0
    assert torch.allclose(loss(lpips_map, weights), lpips_map[..., :5].mean())
    # weights at another size are resized to the map: a constant stays that constant
    assert torch.allclose(loss(lpips_map, torch.full((2, 1, 16, 20), 1.5)), 1.5 * lpips_map.mean())


# ---------------------------------------------------------------------------------------------- LPIPS net


def test_lpips_net_offline_construction_and_use_never_downloads() -> None:
    with no_downloads():
        net = LPIPSNet(pretrained=False)
        x, y = _images(1, 32, 32, seed=10)
        assert torch.isfinite(net(x, y)).all()
        # control: the guard does catch the trunk download that pretrained=True would make
        with pytest.raises(DownloadAttempted):
            LPIPSNet(pretrained=True)


def test_lpips_net_map_frozen_eval_and_differentiable(lpips_net: LPIPSNet) -> None:
    x, y = _images(2, 32, 48, seed=11)
    x.requires_grad_(True)
    lpips_map = lpips_net(x, y)
    assert lpips_map.shape == (2, 1, 32, 48)
    assert (lpips_map >= 0).all() and lpips_map.mean() > 0  # calibrated heads are non-negative
    assert torch.allclose(lpips_net(y, y), torch.zeros(2, 1, 32, 48), atol=1e-6)
    lpips_map.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not parameter.requires_grad and parameter.grad is None for parameter in lpips_net.parameters())
    lpips_net.train()
    assert not lpips_net.training and not lpips_net.net.training
    assert not any(module.training for module in lpips_net.modules())


def test_lpips_net_loads_the_packaged_linear_heads(lpips_net: LPIPSNet) -> None:
    from training.lpips_net import lpips_linear_weights_path

    shipped = torch.load(lpips_linear_weights_path(), map_location="cpu", weights_only=True)
    own = lpips_net.net.state_dict()
    assert len(shipped) == 5
    for key, tensor in shipped.items():
        assert torch.equal(own[key], tensor)


# ---------------------------------------------------------------------------------------------- CSD


def test_negative_prompt_text() -> None:
    assert NEGATIVE_PROMPT == (
        "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
        "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, "
        "jpeg artifacts, deformed, lowres, over-smooth"
    )
    assert NEGATIVE_PROMPT.count("oil painting") == 2


def test_ddpm_alphas_cumprod_is_sd21_scaled_linear() -> None:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    expected = np.cumprod(1 - betas)
    np.testing.assert_allclose(ddpm_alphas_cumprod().numpy(), expected, rtol=1e-5)


def test_csd_timesteps_in_range() -> None:
    csd = ClassifierScoreDistillation()
    timesteps, noise = csd.sample_noise(torch.zeros(4000, 1, 1, 1), torch.Generator().manual_seed(12))
    assert timesteps.dtype == torch.long and noise.shape == (4000, 1, 1, 1)
    assert timesteps.min() >= 20 and timesteps.max() < 500
    assert timesteps.min() <= 25 and timesteps.max() >= 494


def test_csd_matches_hand_computation(tiny_unet: UNet2DConditionModel) -> None:
    csd = ClassifierScoreDistillation(guidance_scale=7.5)
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(13), requires_grad=True)
    positive, negative = _embeddings(2, seed=14)
    weights = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(15)) + 0.5
    loss = csd(latent, tiny_unet, positive, negative, weights=weights, generator=torch.Generator().manual_seed(16))
    loss.backward()

    timesteps, noise = csd.sample_noise(latent, torch.Generator().manual_seed(16))
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alpha_bar = torch.tensor(np.cumprod(1 - betas)[timesteps.numpy()], dtype=torch.float32).view(2, 1, 1, 1)
    z = latent.detach()
    noisy = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_negative = tiny_unet(noisy, timesteps, encoder_hidden_states=negative.expand(2, -1, -1)).sample
        eps_positive = tiny_unet(noisy, timesteps, encoder_hidden_states=positive).sample
    eps_real = eps_negative + 7.5 * (eps_positive - eps_negative)
    x0_real = (noisy - (1 - alpha_bar).sqrt() * eps_real) / alpha_bar.sqrt()
    x0_fake = (noisy - (1 - alpha_bar).sqrt() * eps_negative) / alpha_bar.sqrt()
    g = (x0_fake - x0_real) / ((z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
    latent_weights = F.avg_pool2d(weights, 2)  # bilinear 16 -> 8 (align_corners=False) averages 2x2 blocks
    assert torch.allclose(loss, (latent_weights * g**2).mean(), rtol=1e-4)
    expected_grad = 2 * latent_weights * g / g.numel()
    # batched vs separate U-Net calls round differently; CFG 7.5 amplifies it, hence a scale-relative atol
    assert torch.allclose(latent.grad, expected_grad, rtol=1e-3, atol=1e-4 * expected_grad.abs().max().item())


def test_csd_is_zero_when_guided_and_unconditional_agree(tiny_unet: UNet2DConditionModel) -> None:
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(17), requires_grad=True)
    positive, negative = _embeddings(2, seed=18)
    no_guidance = ClassifierScoreDistillation(guidance_scale=0.0)
    loss = no_guidance(latent, tiny_unet, positive, negative, generator=torch.Generator().manual_seed(19))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(latent.grad) == 0
    same_prompt = ClassifierScoreDistillation(guidance_scale=7.5)
    loss = same_prompt(latent, tiny_unet, positive, positive, generator=torch.Generator().manual_seed(19))
    assert loss.item() < 1e-10
    different = same_prompt(latent, tiny_unet, positive, negative, generator=torch.Generator().manual_seed(19))
    assert different.item() > 1e-4  # the control: distinct prompts do give a loss


def test_csd_gradient_reaches_latent_only_and_adapters_are_off(tiny_unet: UNet2DConditionModel) -> None:
    base = copy.deepcopy(tiny_unet)
    unet = copy.deepcopy(tiny_unet)
    add_lora_adapters(unet, lora_target_modules(unet), rank=2)
    generator = torch.Generator().manual_seed(20)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # peft's gaussian init leaves B at zero: make the adapters matter
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    unet.requires_grad_(True)
    flags_before = {name: parameter.requires_grad for name, parameter in unet.named_parameters()}

    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(21), requires_grad=True)
    positive, negative = _embeddings(2, seed=22)
    csd = ClassifierScoreDistillation()
    loss = csd(latent, frozen_unet(unet), positive, negative, generator=torch.Generator().manual_seed(23))
    loss.backward()
    assert latent.grad is not None and torch.isfinite(latent.grad).all() and latent.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in unet.parameters())
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags_before

    # adapters are off inside the context (equals the base U-Net) and back on after it
    reference = csd(latent.detach(), base, positive, negative, generator=torch.Generator().manual_seed(23))
    assert torch.allclose(loss.detach(), reference, rtol=1e-5)
    adapted = csd(latent.detach(), unet, positive, negative, generator=torch.Generator().manual_seed(23))
    assert not torch.allclose(adapted, reference, rtol=1e-3)


def test_csd_is_deterministic_with_a_seed(tiny_unet: UNet2DConditionModel) -> None:
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(24))
    positive, negative = _embeddings(2, seed=25)
    csd = ClassifierScoreDistillation()

    def run(seed: int) -> torch.Tensor:
        return csd(latent, tiny_unet, positive, negative, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(26), run(26))
    assert not torch.equal(run(26), run(27))


def test_csd_rejects_a_context_that_yields_no_predictor(tiny_unet: UNet2DConditionModel) -> None:
    @contextmanager
    def yields_nothing():
        yield None

    latent = torch.randn(1, 4, 8, 8)
    positive, negative = _embeddings(1, seed=28)
    with pytest.raises(TypeError):
        ClassifierScoreDistillation()(latent, yields_nothing(), positive, negative)


# ---------------------------------------------------------------------------------------------- FiDeSRLoss


def test_fidesr_loss_returns_finite_named_terms(lpips_net: LPIPSNet, tiny_unet: UNet2DConditionModel) -> None:
    loss_fn = FiDeSRLoss(lpips_net)
    sr, hq = _images(2, 32, 32, seed=29)
    sr.requires_grad_(True)
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(30), requires_grad=True)
    positive, negative = _embeddings(2, seed=31)
    common = {"predictor": tiny_unet, "positive_embeds": positive, "negative_embeds": negative}

    for step, expected_alpha in [(0, 0.0), (2500, 0.3), (5000, 0.6)]:
        generator = torch.Generator().manual_seed(32)
        total, terms = loss_fn(sr, hq, latent, step=step, generator=generator, **common)
        expected_names = {"total", "l2", "lpips", "csd", "daw_alpha", "daw_weight_max", "daw_weight_min"}
        assert set(terms) == expected_names
        assert all(torch.isfinite(value) and value.dim() == 0 for value in terms.values())
        assert terms["daw_alpha"].item() == pytest.approx(expected_alpha)
        assert torch.allclose(total.detach(), terms["l2"] + 2 * terms["lpips"] + terms["csd"])
        if step == 0:  # DAW off: the plain losses
            assert torch.allclose(terms["l2"], F.mse_loss(sr.detach(), hq))
            assert torch.allclose(terms["lpips"], lpips_net(sr.detach(), hq).mean())
            assert terms["daw_weight_max"].item() == terms["daw_weight_min"].item() == 1.0
        else:
            assert terms["daw_weight_max"] > 1.0 > terms["daw_weight_min"]

    total.backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_fidesr_loss_without_csd_and_missing_csd_inputs(lpips_net: LPIPSNet) -> None:
    sr, hq = _images(1, 32, 32, seed=33)
    total, terms = FiDeSRLoss(lpips_net, lambda_csd=0.0)(sr, hq, step=0)
    assert terms["csd"].item() == 0.0
    assert torch.allclose(total, F.mse_loss(sr, hq) + 2 * lpips_net(sr, hq).mean())
    with pytest.raises(SettingsError):
        FiDeSRLoss(lpips_net)(sr, hq, step=0)
