"""A plain, independent re-implementation of the released FiDeSR inference (docs/algorithm.md §2–4) for parity tests.

Written from docs/algorithm.md (and, where the algorithm page leaves a detail open, from
facts read in the authors' released test code), never from ``fidesr_core``'s
implementation, so that agreement between the two is a real cross-check.
Deliberately unoptimised: loops and explicit formulas over cleverness.
The image steps around the network (latent tiling, colour fix, pre-processing)
live in ``reference_image_steps.py``.

Everything works on float32 CPU tensors, images ``[B, 3, H, W]``, latents
``[B, 4, h, w]``.  Strengths follow the *released* script's meaning (both
branches on → their outputs are averaged with ``merge``); translating them to
the engine's effective strengths is the tests' job.

Details the algorithm page leaves open, as read here (all confirmed in the released code):

* bilinear resizing of the detail map uses ``align_corners=False``, no antialias;
* ``pnorm`` quantiles use linear interpolation (``torch.quantile``'s default);
* the LF branch's channel gate uses the LF cutoff and order (``rc_ch = rc_lf``);
* LoRA: ``LoraConfig(r=rank)`` with no alpha, as the released code builds it, so peft's default
  alpha 8 applies (scale ``8 / rank``; the paper's ``lora_alpha = rank`` agrees only at the released rank 8).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig
from reference_image_steps import (
    ref_adain,
    ref_bicubic_resize,
    ref_lq_uint8,
    ref_released_finish,
    ref_tiled,
    ref_to_tensor,
    ref_wavelet,
)

__all__ = [
    "SCALING_FACTOR",
    "LRRB_PARAMETER_SHAPES",
    "ref_lrrb",
    "ref_butterworth_lowpass_mask",
    "ref_lowpass",
    "ref_highpass",
    "ref_conv3_replicate",
    "ref_percentile_normalize",
    "ref_detail_map",
    "ref_spatial_gate",
    "ref_channel_gate",
    "ref_lfim",
    "ref_empty_prompt_embedding",
    "ref_lora_unet",
    "ref_restored_latent",
    "ref_released_latent",
    "ref_decode_and_finish",
]

SCALING_FACTOR = 0.18215


# ---------------------------------------------------------------- LRRB (docs/algorithm.md §3)


def _lrrb_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"in_conv.weight": (64, 8, 1, 1), "in_conv.bias": (64,)}
    for block in ("db1", "db2", "db3"):
        for index, in_channels in enumerate((64, 96, 128, 160, 192), start=1):
            out_channels = 64 if index == 5 else 32
            shapes[f"{block}.conv{index}.weight"] = (out_channels, in_channels, 3, 3)
            shapes[f"{block}.conv{index}.bias"] = (out_channels,)
    shapes["out_conv.weight"] = (4, 64, 1, 1)
    shapes["out_conv.bias"] = (4,)
    return shapes


LRRB_PARAMETER_SHAPES: dict[str, tuple[int, ...]] = _lrrb_shapes()


def _dense_block(state: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    features = [x]
    for index in range(1, 6):
        stacked = torch.cat(features, dim=1)
        out = F.conv2d(stacked, state[f"{prefix}.conv{index}.weight"], state[f"{prefix}.conv{index}.bias"], padding=1)
        if index < 5:
            out = F.silu(out)
            features.append(out)
        else:
            return out
    raise AssertionError("unreachable")


def ref_lrrb(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """LRRB forward from a state dict with the official names; ``x`` is ``cat([z_L, r])`` ``[B, 8, h, w]``."""
    f = F.conv2d(x, state["in_conv.weight"], state["in_conv.bias"])
    for block in ("db1", "db2", "db3"):
        f = f + 0.2 * _dense_block(state, block, f)
    return F.conv2d(f, state["out_conv.weight"], state["out_conv.bias"])


# ------------------------------------------------------- Butterworth filters (docs/algorithm.md §4)


def ref_butterworth_lowpass_mask(height: int, width: int, cutoff: float, order: int) -> torch.Tensor:
    """``[H, W//2 + 1]`` low-pass mask with the released, unwrapped row frequencies (explicit loops)."""
    columns = width // 2 + 1
    radius = torch.zeros(height, columns, dtype=torch.float64)
    for k in range(height):
        for j in range(columns):
            ky = k / max(height - 1, 1)
            kx = j / max(width // 2, 1)
            radius[k, j] = math.sqrt(ky * ky + kx * kx)
    radius = radius / max(float(radius.max()), 1.0)
    return (1.0 / (1.0 + (radius / cutoff) ** (2 * order))).to(torch.float32)


def ref_lowpass(x: torch.Tensor, cutoff: float, order: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    spectrum = torch.fft.rfft2(x.to(torch.float32), dim=(-2, -1))
    mask = ref_butterworth_lowpass_mask(height, width, cutoff, order)
    return torch.fft.irfft2(spectrum * mask, s=(height, width), dim=(-2, -1))


def ref_highpass(x: torch.Tensor, cutoff: float, order: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    spectrum = torch.fft.rfft2(x.to(torch.float32), dim=(-2, -1))
    mask = 1.0 - ref_butterworth_lowpass_mask(height, width, cutoff, order)
    return torch.fft.irfft2(spectrum * mask, s=(height, width), dim=(-2, -1))


# ------------------------------------------------------------- detail map (docs/algorithm.md §4)


def ref_conv3_replicate(x: torch.Tensor, kernel: list[list[float]]) -> torch.Tensor:
    """3x3 correlation of ``[B, 1, H, W]`` with replicate padding."""
    weight = torch.tensor(kernel, dtype=x.dtype).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight)


_BOX3 = [[1.0 / 9.0] * 3 for _ in range(3)]


def ref_percentile_normalize(x: torch.Tensor, low: float = 0.05, high: float = 0.95) -> torch.Tensor:
    """Per-image ``clamp((x − q_low) / (q_high − q_low + 1e-6), 0, 1)``; quantiles over all of the image's values."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        values = x[b].reshape(-1).float()
        q_low = torch.quantile(values, low)
        q_high = torch.quantile(values, high)
        out[b] = torch.clamp((x[b] - q_low) / (q_high - q_low + 1e-6), 0.0, 1.0)
    return out


def ref_detail_map(image: torch.Tensor, shift_to_unit: bool = True) -> torch.Tensor:
    """``D`` of ``[B, 3, H, W]`` in [−1, 1] -> ``[B, 1, H, W]``."""
    y = image.float() * 0.5 + 0.5 if shift_to_unit else image.float()
    gray = 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]
    sobel_x = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
    sobel_y = [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]
    laplacian = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]
    gx = ref_conv3_replicate(gray, sobel_x)
    gy = ref_conv3_replicate(gray, sobel_y)
    sobel = torch.sqrt(gx**2 + gy**2)
    lap = ref_conv3_replicate(gray, laplacian).abs()
    local_mean = ref_conv3_replicate(gray, _BOX3)
    variance = ref_conv3_replicate((gray - local_mean) ** 2, _BOX3)
    detail = (sobel + lap + variance) / 3.0
    return ref_conv3_replicate(ref_percentile_normalize(detail), _BOX3)


def ref_spatial_gate(upscaled_lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    detail = ref_detail_map(upscaled_lq)
    return F.interpolate(detail, size=size, mode="bilinear", align_corners=False).clamp(0.0, 1.0)


# -------------------------------------------------------------------- LFIM (docs/algorithm.md §4)


def ref_channel_gate(z_lq: torch.Tensor, cutoff: float, order: int, tau: float, sharp: float) -> torch.Tensor:
    low = ref_lowpass(z_lq, cutoff, order)
    gate = torch.empty(z_lq.shape[0], z_lq.shape[1], 1, 1)
    for b in range(z_lq.shape[0]):
        for c in range(z_lq.shape[1]):
            low_norm = max(float(torch.linalg.vector_norm(low[b, c].double())), 1e-6)
            full_norm = max(float(torch.linalg.vector_norm(z_lq[b, c].double())), 1e-6)
            ratio = min(max(low_norm / full_norm, 0.0), 1.0)
            gate[b, c] = 1.0 / (1.0 + math.exp(-sharp * (ratio - tau)))
    return gate


def ref_lfim(
    z: torch.Tensor,
    z_lq: torch.Tensor,
    refined_residual: torch.Tensor,
    upscaled_lq: torch.Tensor,
    *,
    lf_scale: float,
    hf_scale: float,
    lf_rc: float = 0.10,
    lf_order: int = 2,
    lf_tau: float = 0.8,
    lf_sharp: float = 10.0,
    lf_gamma: float = 1.2,
    hf_rc: float = 0.32,
    hf_order: int = 2,
    hf_gamma: float = 1.2,
    merge: float = 0.5,
) -> torch.Tensor:
    """The released LFIM with the released script's scales (a branch is on when its scale is > 0)."""
    size = (z.shape[-2], z.shape[-1])
    spatial = ref_spatial_gate(upscaled_lq, size)
    channel = ref_channel_gate(z_lq, lf_rc, lf_order, lf_tau, lf_sharp)
    z_lf = z
    z_hf = z
    if lf_scale > 0:
        magnitude = refined_residual.abs()
        residual_map = 0.8 * magnitude.mean(dim=1, keepdim=True) + 0.2 * magnitude.std(dim=1, keepdim=True)
        residual_map = ref_percentile_normalize(residual_map)
        lf_map = ref_percentile_normalize((1.0 - spatial) * residual_map) ** lf_gamma
        z_lf = z + lf_scale * lf_map * channel * ref_lowpass(z, lf_rc, lf_order)
    if hf_scale > 0:
        delta_hp = ref_highpass(z, hf_rc, hf_order) - ref_highpass(z_lq, hf_rc, hf_order)
        z_hf = z + hf_scale * spatial**hf_gamma * (1.0 - channel) * delta_hp
    if lf_scale > 0 and hf_scale > 0:
        return merge * z_lf + (1.0 - merge) * z_hf
    if lf_scale > 0:
        return z_lf
    return z_hf


# ------------------------------------------------------------ the network (docs/algorithm.md §2)


def ref_empty_prompt_embedding(text_encoder: torch.nn.Module) -> torch.Tensor:
    ids = torch.zeros(1, 77, dtype=torch.long)
    ids[0, 0] = 49406
    ids[0, 1] = 49407
    with torch.no_grad():
        return text_encoder(input_ids=ids).last_hidden_state.float()


def ref_lora_unet(
    unet: torch.nn.Module, rank: int, target_modules: dict[str, list[str]], lora_state: dict
) -> torch.nn.Module:
    """A copy of ``unet`` with the three peft adapters attached (unmerged, peft's default alpha) and filled from ``lora_state``."""
    unet = copy.deepcopy(unet)
    names = list(target_modules)
    for name in names:
        config = LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=target_modules[name])
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: intended
            warnings.simplefilter("ignore", UserWarning)
            unet.add_adapter(config, adapter_name=name)
    unet.set_adapters(names, [1.0] * len(names))
    loaded = 0
    for name, parameter in unet.named_parameters():
        if "lora" in name:
            parameter.data.copy_(lora_state[name])
            loaded += 1
    assert loaded == len(lora_state), f"loaded {loaded} of {len(lora_state)} LoRA tensors"
    return unet.eval()


def ref_restored_latent(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    lrrb_state: dict[str, torch.Tensor],
    embedding: torch.Tensor,
    pixels: torch.Tensor,
    *,
    tile: int = 0,
    overlap: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_L, r̃, z) for ``pixels`` in [−1, 1]: mode-encode, U-Net at t = 1, LRRB, subtract.

    ``tile > 0`` tiles the U-Net (per-axis clamp) and runs the LRRB once on the stitched residual.
    """
    with torch.no_grad():
        z_lq = SCALING_FACTOR * vae.encode(pixels).latent_dist.mode()
        timestep = torch.tensor([1], dtype=torch.long)

        def unet_fn(latent: torch.Tensor) -> torch.Tensor:
            hidden = embedding.expand(latent.shape[0], -1, -1)
            return unet(latent, timestep, encoder_hidden_states=hidden).sample

        residual = ref_tiled(unet_fn, z_lq, tile, overlap) if tile else unet_fn(z_lq)
        refined = residual + ref_lrrb(lrrb_state, torch.cat([z_lq, residual], dim=1))
        return z_lq, refined, z_lq - refined


def ref_released_latent(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    lrrb_state: dict[str, torch.Tensor],
    embedding: torch.Tensor,
    pixels: torch.Tensor,
    *,
    lf_scale: float,
    hf_scale: float,
) -> torch.Tensor:
    """The latent handed to the decoder by the released inference (untiled), released scales."""
    z_lq, refined, z = ref_restored_latent(unet, vae, lrrb_state, embedding, pixels)
    if lf_scale <= 0 and hf_scale <= 0:
        return z
    return ref_lfim(z, z_lq, refined, pixels, lf_scale=lf_scale, hf_scale=hf_scale)


def ref_decode_and_finish(
    vae: torch.nn.Module,
    latent: torch.Tensor,
    pixels: torch.Tensor,
    output_size: tuple[int, int] | None,
    color_fix: str,
) -> torch.Tensor:
    """Decode and clamp; colour fix against the network input ``pixels``; resize to ``output_size`` if it differs.

    When ``pixels`` are 8-bit values (``ref_prepare_lq`` of an 8-bit image), the released 8-bit
    finishing (``ref_released_finish``: truncations to 8 bits, colour fix on 8-bit images, PIL
    bicubic resize); otherwise the engine's float path (the same steps on floats).  The released
    FiDeSR and PiSA-SR scripts resize back only pre-enlarged images, OSEDiff never: callers pass
    ``output_size`` accordingly (None keeps the processing size).
    """
    with torch.no_grad():
        decoded = vae.decode(latent / SCALING_FACTOR).sample.clamp(-1.0, 1.0)
    sources = [ref_lq_uint8(one) for one in pixels]
    if all(source is not None for source in sources):
        finished = [ref_released_finish(d, s, color_fix, output_size) for d, s in zip(decoded, sources, strict=True)]
        return torch.stack([ref_to_tensor(array) for array in finished])
    image = (decoded * 0.5 + 0.5).clamp(0.0, 1.0)
    reference = pixels * 0.5 + 0.5
    if color_fix == "adain":
        image = ref_adain(image, reference)
    elif color_fix == "wavelet":
        image = ref_wavelet(image, reference)
    if output_size is not None and tuple(image.shape[-2:]) != tuple(output_size):
        image = ref_bicubic_resize(image, output_size)
    return image
