"""Validation during training: super-resolve a folder of LQ images with the current weights.

The images go through the inference pipeline itself (``fidesr_core.upscale``: ×4
pre-processing, latent tiling, LRRB, VAE decode, colour fix), driven by the
training networks with the LoRA adapters active rather than merged, so what is
saved is what the released weights of this step would produce.  Outputs are
written to ``OUTPUT/validation/step-N/NAME.png``.  When an HQ folder is given,
images with the same stem are scored: PSNR on RGB (8-bit values) and LPIPS with
the training loss's VGG network.  These are progress indicators; the paper's
Table 1 numbers come from ``python -m training.evaluate``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fidesr_core.app.image_io import image_files_in, load_image, save_png_atomic
from fidesr_core.errors import SettingsError
from fidesr_core.networks.model import OneStepRestorer
from fidesr_core.pipeline import upscale
from fidesr_core.settings import UpscaleSettings

from .generator import FiDeSRGenerator

__all__ = ["ValidationImage", "collect_validation_images", "psnr", "training_model_view", "run_validation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationImage:
    name: str  # file stem, used for the output file
    lq: Path
    hq: Path | None


def _images_by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise SettingsError(f"validation {role} folder {folder} does not exist")
    return {path.stem: path for path in image_files_in(folder)}


def collect_validation_images(
    lq_folder: str | os.PathLike, hq_folder: str | os.PathLike | None = None, *, max_images: int = 0
) -> list[ValidationImage]:
    """LQ images of ``lq_folder`` (sorted), each with the HQ image of the same stem when ``hq_folder`` has one."""
    lq = _images_by_stem(Path(lq_folder).expanduser(), "LQ")
    if not lq:
        raise SettingsError(f"validation LQ folder {lq_folder} holds no PNG/JPEG/WebP images")
    hq = _images_by_stem(Path(hq_folder).expanduser(), "HQ") if hq_folder is not None else {}
    if hq_folder is not None and not set(lq) & set(hq):
        logger.warning("validation: no HQ image in %s shares a file stem with the LQ images", hq_folder)
    images = [ValidationImage(name=stem, lq=path, hq=hq.get(stem)) for stem, path in lq.items()]
    return images[:max_images] if max_images else images


def psnr(restored: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two ``[B, 3, H, W]`` images in [0, 1], on their 8-bit values (inf when identical)."""
    a = (restored.float().clamp(0, 1) * 255).round()
    b = (reference.float().clamp(0, 1) * 255).round()
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def training_model_view(
    generator: FiDeSRGenerator, prompt_embedding: torch.Tensor, dtype: torch.dtype
) -> OneStepRestorer:
    """A ``OneStepRestorer`` sharing the generator's networks (LoRA active, not merged) for ``fidesr_core`` calls."""
    return OneStepRestorer(
        unet=generator.unet,
        vae=generator.vae,
        lrrb=generator.lrrb,
        prompt_embedding=prompt_embedding,
        dtype=dtype,
        description={"weights": "training (LoRA unmerged)"},
        scaling_factor=generator.scaling_factor,
    )


@torch.no_grad()
def run_validation(
    generator: FiDeSRGenerator,
    prompt_embedding: torch.Tensor,
    images: list[ValidationImage],
    output_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    settings: UpscaleSettings | None = None,
    lpips_net: nn.Module | None = None,
) -> dict[str, float]:
    """Upscale every LQ image, save PNGs into ``output_dir`` and return mean metrics.

    Returns ``{"psnr": …, "lpips": …, "images": n_scored}`` for the images that have an HQ
    partner of the output's size (other sizes are skipped with a warning); ``{"images": 0}``
    when none has.  The generator is put in eval mode and restored afterwards.
    """
    settings = settings or UpscaleSettings(latent_mode="mode")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model = training_model_view(generator, prompt_embedding, dtype)
    was_training = generator.training
    generator.eval()
    scores: dict[str, list[float]] = {"psnr": [], "lpips": []}
    try:
        for image in images:
            restored = upscale(model, load_image(image.lq).rgb, settings)  # [1, 3, 4H, 4W] in [0, 1], CPU
            save_png_atomic(folder / f"{image.name}.png", restored[0])
            if image.hq is None:
                continue
            reference = load_image(image.hq).rgb
            if reference.shape != restored.shape:
                logger.warning(
                    "validation: %s is %s but its HQ %s is %s; not scored",
                    image.name,
                    tuple(restored.shape[-2:]),
                    image.hq,
                    tuple(reference.shape[-2:]),
                )
                continue
            scores["psnr"].append(psnr(restored, reference))
            if lpips_net is not None:
                device = next(lpips_net.parameters()).device
                distance = lpips_net(restored.to(device) * 2 - 1, reference.to(device) * 2 - 1)
                scores["lpips"].append(float(distance.mean()))
    finally:
        generator.train(was_training)
    result: dict[str, float] = {"images": float(len(scores["psnr"]))}
    for name, values in scores.items():
        if values:
            result[name] = sum(values) / len(values)
    (folder / "metrics.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
