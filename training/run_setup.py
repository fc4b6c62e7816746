"""What a training run builds from its config before the first step (used by :func:`training.train.train`).

The accelerator, the loss (LPIPS, CSD, DAW), the tokenizer check, the degradation settings and
the validation images.  Nothing here runs a step; see ``training.training_loop`` for that.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fidesr_core.errors import SettingsError

from .config import TrainConfig
from .csd import ClassifierScoreDistillation
from .data import HQCropDataset
from .generator import TOKENIZER_HINT

__all__ = [
    "WEIGHT_DTYPES",
    "AutocastModule",
    "build_loss",
    "check_tokenizer",
    "degradation_settings",
    "load_validation_images",
    "make_accelerator",
]

# the trainer's logger: its messages keep the name they had when all of this lived in training.train
logger = logging.getLogger("training.train")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by mixed_precision


def check_tokenizer(config: TrainConfig, tokenizer, dataset: HQCropDataset) -> None:
    """Raise a :class:`SettingsError` when the run needs a CLIP tokenizer and ``tokenizer`` is None."""
    reasons = []
    if config.loss.lambda_csd > 0:
        reasons.append("CSD needs the negative prompt")
    if dataset.has_captions and config.data.caption_dropout < 1.0:
        reasons.append("the training images have captions")
    if reasons and tokenizer is None:
        raise SettingsError(f"a CLIP tokenizer is needed ({'; '.join(reasons)}) but none was found: {TOKENIZER_HINT}")


class AutocastModule(torch.nn.Module):
    """Runs the wrapped network under the accelerator's autocast (a no-op without mixed precision)."""

    def __init__(self, inner: torch.nn.Module, accelerator) -> None:
        super().__init__()
        self.inner = inner
        self._accelerator = accelerator

    def forward(self, *args, **kwargs):
        with self._accelerator.autocast():
            return self.inner(*args, **kwargs)


def build_loss(config: TrainConfig, accelerator, lpips_net: torch.nn.Module | None):
    """The :class:`~training.losses.FiDeSRLoss` of ``config.loss`` (LPIPS under autocast, CSD when weighted)."""
    from .losses import FiDeSRLoss
    from .lpips_net import LPIPSNet

    loss = config.loss
    if lpips_net is None:
        if not loss.lpips_pretrained and loss.lpips_trunk_weights is None:
            logger.warning("LPIPS uses a random VGG trunk (loss.lpips_pretrained=false): fine for tests only")
        lpips_net = LPIPSNet(pretrained=loss.lpips_pretrained, trunk_weights=loss.lpips_trunk_weights)
    csd = None
    if loss.lambda_csd > 0:
        csd = ClassifierScoreDistillation(
            guidance_scale=loss.csd_guidance, min_timestep=loss.csd_min_timestep, max_timestep=loss.csd_max_timestep
        )
    return FiDeSRLoss(
        AutocastModule(lpips_net, accelerator),
        csd,
        lambda_l2=loss.lambda_l2,
        lambda_lpips=loss.lambda_lpips,
        lambda_csd=loss.lambda_csd,
        daw_start=loss.daw_start,
        daw_ramp=loss.daw_ramp,
        daw_alpha_max=loss.daw_alpha,
        daw_w_max=loss.daw_w_max,
        perceptual_mix=loss.daw_perceptual_mix,
    )


def make_accelerator(config: TrainConfig):
    """An ``accelerate.Accelerator`` for the run: accumulation, mixed precision, TensorBoard logs under the run."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    output = Path(config.output_dir)
    log_with = "tensorboard" if config.logging.tensorboard and is_tensorboard_available() else None
    return Accelerator(
        gradient_accumulation_steps=config.optim.gradient_accumulation,
        mixed_precision=config.optim.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def degradation_settings(values: dict) -> dict:
    """YAML lists -> tuples for the frozen DegradationConfig."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def load_validation_images(config: TrainConfig) -> list:
    """The validation LQ (and HQ) images of ``config.validation``; none when it names no folder."""
    if not config.validation.lq_folder:
        return []
    from .validation import collect_validation_images

    return collect_validation_images(
        config.validation.lq_folder, config.validation.hq_folder, max_images=config.validation.max_images
    )
