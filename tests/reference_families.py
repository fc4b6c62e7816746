"""Plain, independent re-implementations of the released PiSA-SR and OSEDiff inference, for parity tests.

Written from facts read in the authors' released test scripts (and docs/algorithm.md §9), never
from ``fidesr_core``'s restoration code, so that agreement is a real cross-check.  Like
``reference_impl.py`` for FiDeSR: deliberately unoptimised, float32 on the CPU, images
``[B, 3, H, W]``, latents ``[B, 4, h, w]``; only the stock diffusers / transformers / peft
modules are shared with the engine.

Released facts reproduced here:

* LoRA: ``LoraConfig(r=rank)`` without an alpha, so peft's default 8 applies (scale ``8 / rank``).
* PiSA-SR: the pixel adapters are merged into the U-Net first (those weights are kept as the
  "pixel" U-Net), then the semantic ones on top.  Default mode: one call with both at t = 1.
  Adjustable mode: ``λ_pix·ε_pix + λ_sem·(ε_both − ε_pix)``.  ``z = z_L − ε``.  Prompt ``""``.
  Its tiler is FiDeSR's (centred Gaussian weights), which crashes on thin latents; the fixed
  reference tiler (``reference_image_steps.ref_tiled``, each axis clamped) stands in for it.
* OSEDiff: peft adapters left unmerged (the script's default), the saved ``conv_in`` copied into
  the wrapped layer's base weights, the VAE encoder's adapter likewise unmerged; U-Net at t = 999
  on ``f"{tags}, {prompt},"`` (no tags here); one DDPM step with a single inference step, whose
  previous timestep is −1, so ``ᾱ_prev = 1`` and the step returns ``x0 = (z_L − √(1−ᾱ)·ε)/√ᾱ``
  (its variance term is ``√1e-20 · noise``, left out).  Its tiler clamps the tile to a square of
  the latent's short side and centres the weight's rows at ``T/2`` instead of ``(T−1)/2``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from reference_image_steps import ref_tile_starts, ref_tiled
from transformers import CLIPTokenizer

__all__ = [
    "SCALING_FACTOR",
    "ref_tokenizer",
    "ref_prompt_embedding",
    "ref_lora_delta",
    "RefPiSASR",
    "ref_pisa_sr_latents",
    "ref_osediff_networks",
    "ref_osediff_tiled",
    "ref_alpha_bar",
    "ref_osediff_latents",
]

SCALING_FACTOR = 0.18215
PEFT_DEFAULT_ALPHA = 8
_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base" / "tokenizer"


# ------------------------------------------------------------------------------------ prompts


def ref_tokenizer() -> CLIPTokenizer:
    """SD 2's tokenizer: CLIP's BPE with ``!`` as padding, 77 tokens (the files the package ships)."""
    tokenizer = CLIPTokenizer(str(_TOKENIZER_DIR / "vocab.json"), str(_TOKENIZER_DIR / "merges.txt"), pad_token="!")
    tokenizer.model_max_length = 77
    return tokenizer


def ref_prompt_embedding(text_encoder: torch.nn.Module, text: str) -> torch.Tensor:
    """The released ``encode_prompt``: tokenize padded to 77, last hidden state."""
    tokenizer = ref_tokenizer()
    ids = tokenizer(text, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0].float()


# ----------------------------------------------------------------------------------- PiSA-SR


def ref_lora_delta(
    base_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The weight change of one LoRA layer, by layer kind (linear, 1x1 conv, kxk conv)."""
    if base_weight.ndim == 2:
        return (lora_b @ lora_a) * scaling
    if base_weight.shape[2:] == (1, 1):
        return (lora_b[:, :, 0, 0] @ lora_a[:, :, 0, 0])[:, :, None, None] * scaling
    return F.conv2d(lora_a.permute(1, 0, 2, 3), lora_b).permute(1, 0, 2, 3) * scaling


def _merged(unet: torch.nn.Module, checkpoint: dict, kind: str) -> torch.nn.Module:
    """A copy of ``unet`` with the ``kind`` ("pix" / "sem") adapters of a PiSA-SR checkpoint merged in."""
    unet = copy.deepcopy(unet)
    scaling = PEFT_DEFAULT_ALPHA / checkpoint[f"lora_rank_unet_{kind}"]
    state = checkpoint["state_dict_unet"]
    with torch.no_grad():
        for part in ("encoder", "decoder", "others"):
            adapter = f"default_{part}_{kind}"
            for module in checkpoint[f"unet_lora_{part}_modules_{kind}"]:
                weight = unet.get_submodule(module).weight
                lora_a = state[f"{module}.lora_A.{adapter}.weight"].float()
                lora_b = state[f"{module}.lora_B.{adapter}.weight"].float()
                weight.add_(ref_lora_delta(weight, lora_a, lora_b, scaling))
    return unet.eval()


class RefPiSASR:
    """The released PiSA-SR U-Net in both configurations: pixel set merged, and pixel then semantic merged."""

    def __init__(self, unet: torch.nn.Module, checkpoint: dict) -> None:
        self.pixel_unet = _merged(unet, checkpoint, "pix")
        self.both_unet = _merged(self.pixel_unet, checkpoint, "sem")

    def predict(
        self, latent: torch.Tensor, embedding: torch.Tensor, *, default: bool, lambda_pix: float, lambda_sem: float
    ) -> torch.Tensor:
        timestep = torch.tensor([1], dtype=torch.long)
        hidden = embedding.expand(latent.shape[0], -1, -1)
        with torch.no_grad():
            both = self.both_unet(latent, timestep, encoder_hidden_states=hidden).sample
            if default:
                return both
            pixel = self.pixel_unet(latent, timestep, encoder_hidden_states=hidden).sample
        return lambda_pix * pixel + lambda_sem * (both - pixel)


def ref_pisa_sr_latents(
    model: RefPiSASR,
    vae: torch.nn.Module,
    embedding: torch.Tensor,
    pixels: torch.Tensor,
    *,
    default: bool = True,
    lambda_pix: float = 1.0,
    lambda_sem: float = 1.0,
    tile: int = 0,
    overlap: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_L, z) for ``pixels`` in [−1, 1]: mode-encode, U-Net prediction (tiled when ``tile``), ``z = z_L − ε``."""
    with torch.no_grad():
        z_lq = SCALING_FACTOR * vae.encode(pixels).latent_dist.mode()

    def predict(latent: torch.Tensor) -> torch.Tensor:
        return model.predict(latent, embedding, default=default, lambda_pix=lambda_pix, lambda_sem=lambda_sem)

    prediction = ref_tiled(predict, z_lq, tile, overlap) if tile else predict(z_lq)
    return z_lq, z_lq - prediction


# ----------------------------------------------------------------------------------- OSEDiff


def _add(network: torch.nn.Module, rank: int, modules: list[str], adapter: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=modules), adapter)


def ref_osediff_networks(
    unet: torch.nn.Module, vae: torch.nn.Module, checkpoint: dict
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Copies of ``unet`` and ``vae`` loaded as the released ``load_ckpt`` does (adapters unmerged)."""
    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    names = ("default_encoder", "default_decoder", "default_others")
    for name, part in zip(names, ("encoder", "decoder", "others"), strict=True):
        _add(unet, checkpoint["rank_unet"], checkpoint[f"unet_lora_{part}_modules"], name)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora" in name or "conv_in" in name:
                parameter.copy_(checkpoint["state_dict_unet"][name])
    unet.set_adapter(list(names))
    _add(vae, checkpoint["rank_vae"], checkpoint["vae_lora_encoder_modules"], "default_encoder")
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if "lora" in name:
                parameter.copy_(checkpoint["state_dict_vae"][name])
    vae.set_adapter(["default_encoder"])
    return unet.eval(), vae.eval()


def _osediff_weight(size: int) -> tuple[list[float], list[float]]:
    """OSEDiff's 1-D tile weights (columns centred at (T−1)/2, rows at T/2), variance 0.01·T²."""

    def gauss(position: int, centre: float) -> float:
        return math.exp(-((position - centre) ** 2) / (size * size) / (2 * 0.01)) / math.sqrt(2 * math.pi * 0.01)

    return [gauss(x, (size - 1) / 2) for x in range(size)], [gauss(y, size / 2) for y in range(size)]


def ref_osediff_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int
) -> torch.Tensor:
    """OSEDiff's latent tiler: square tiles of ``min(tile, h, w)``, its own weights, weighted average."""
    height, width = x.shape[-2:]
    if height * width <= tile * tile:
        return fn(x).float()
    tile = min(tile, min(height, width))
    x_probs, y_probs = _osediff_weight(tile)
    weight = torch.tensor([[y * xv for xv in x_probs] for y in y_probs], dtype=torch.float64)
    total = torch.zeros(x.shape, dtype=torch.float64)
    contributors = torch.zeros(x.shape, dtype=torch.float64)
    for top in ref_tile_starts(height, tile, overlap):
        for left in ref_tile_starts(width, tile, overlap):
            out = fn(x[:, :, top : top + tile, left : left + tile]).double()
            total[:, :, top : top + tile, left : left + tile] += out * weight
            contributors[:, :, top : top + tile, left : left + tile] += weight
    return (total / contributors).float()


def ref_alpha_bar(timestep: int) -> torch.Tensor:
    """``ᾱ_t`` of SD 2.1's schedule (scaled-linear betas 0.00085 → 0.012 over 1000 steps), as diffusers keeps it."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    return scheduler.alphas_cumprod[timestep]


def ref_osediff_latents(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    embedding: torch.Tensor,
    pixels: torch.Tensor,
    *,
    tile: int = 0,
    overlap: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_L, x0) for ``pixels`` in [−1, 1]: mode-encode (encoder LoRA), ε at t = 999, one DDPM step to x0."""
    timestep = torch.tensor([999], dtype=torch.long)
    with torch.no_grad():
        z_lq = SCALING_FACTOR * vae.encode(pixels).latent_dist.mode()

        def predict(latent: torch.Tensor) -> torch.Tensor:
            return unet(latent, timestep, encoder_hidden_states=embedding.expand(latent.shape[0], -1, -1)).sample

        noise = ref_osediff_tiled(predict, z_lq, tile, overlap) if tile else predict(z_lq)
    alpha = ref_alpha_bar(999)
    x0 = (z_lq - (1 - alpha) ** 0.5 * noise) / alpha**0.5
    return z_lq, x0
