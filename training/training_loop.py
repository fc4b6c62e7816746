"""The pieces of one optimisation step of :func:`training.train.train` (docs/algorithm.md §5).

A micro-step: HQ crops -> Real-ESRGAN degradation on the device -> generator -> loss with
DAW.  Every random draw of micro-step ``m`` on process ``p`` comes from generators seeded by
``(seed, m, p)``, so a resumed run continues exactly where the interrupted one stopped.  After
the step: the logged values (averaged over processes), checkpoints and validation.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import save_checkpoint
from .config import TrainConfig
from .csd import NEGATIVE_PROMPT
from .data import derive_seed
from .degradation import DegradationConfig, degrade, make_generator
from .generator import FiDeSRGenerator, PromptEncoder

__all__ = [
    "LOGGED_TERMS",
    "StepContext",
    "autocast_teacher",
    "micro_step_loss",
    "save_step_checkpoint",
    "step_logs",
    "validate_step",
]

# the trainer's logger: its messages keep the name they had when all of this lived in training.train
logger = logging.getLogger("training.train")

LOGGED_TERMS = ("total", "l2", "lpips", "csd", "daw_alpha", "daw_weight_max", "daw_weight_min")


@dataclass
class StepContext:
    config: TrainConfig
    accelerator: object
    model: torch.nn.Module  # the prepared (possibly DDP-wrapped) generator
    generator: FiDeSRGenerator  # unwrapped
    prompts: PromptEncoder
    loss_fn: torch.nn.Module
    degradation: DegradationConfig
    csd_unet: torch.nn.Module | None


def micro_step_loss(ctx: StepContext, batch: dict, *, step: int, micro_step: int) -> tuple[torch.Tensor, dict]:
    """Forward and loss of one micro-batch; returns ``(loss, terms)``."""
    accelerator, config = ctx.accelerator, ctx.config
    device, process = accelerator.device, accelerator.process_index
    hq = batch["hq"].to(device, non_blocking=True)  # [B, 3, S, S] in [0, 1]
    lq = degrade(
        hq, config=ctx.degradation, generator=make_generator(derive_seed(config.seed, 2, micro_step, process), device)
    )
    draws = make_generator(derive_seed(config.seed, 3, micro_step, process), device)  # VAE sample, CSD t and noise
    suffix = config.data.caption_suffix
    captions = [f"{caption}{suffix}" if caption else "" for caption in batch["caption"]]
    caption_embeds = ctx.prompts.encode(captions) if any(captions) else ctx.prompts.cached("")
    # as released: one coin per batch decides whether the generator sees the captions or ""
    coin = torch.rand((), generator=torch.Generator().manual_seed(derive_seed(config.seed, 4, micro_step, process)))
    generator_embeds = ctx.prompts.cached("") if float(coin) < config.data.caption_dropout else caption_embeds
    output = ctx.model(lq * 2 - 1, generator_embeds, draws)  # autocast inside when mixed precision is on
    teacher = ctx.csd_unet if ctx.csd_unet is not None else ctx.generator.frozen_predictor()
    negative = ctx.prompts.cached(NEGATIVE_PROMPT) if config.loss.lambda_csd > 0 else None
    # L2 and the DAW maps in float32; the LPIPS net and the CSD teacher under autocast (as released)
    return ctx.loss_fn(
        output.image,
        hq * 2 - 1,
        output.latent,
        step=step,
        predictor=autocast_teacher(accelerator, teacher),
        positive_embeds=caption_embeds,
        negative_embeds=negative,
        generator=draws,
    )


@contextlib.contextmanager
def autocast_teacher(accelerator, teacher):
    """Yield a noise predictor calling ``teacher`` (a U-Net or a context manager yielding one) under autocast."""
    opened = teacher if hasattr(teacher, "__enter__") else contextlib.nullcontext(teacher)
    with opened as unet:

        def predict(*args, **kwargs):
            with accelerator.autocast():
                return unet(*args, **kwargs)

        yield predict


def step_logs(accelerator, sums: dict[str, torch.Tensor], grad_norm, optimizer) -> dict[str, float]:
    """The values logged after a step (``loss/…``, ``daw/…``, ``grad_norm``, ``lr``), averaged over processes."""
    names = list(sums)
    values = torch.stack([sums[name].to(accelerator.device) for name in names])
    values = accelerator.reduce(values, reduction="mean") if accelerator.num_processes > 1 else values
    logs = {}
    for name, value in zip(names, values.tolist(), strict=True):
        logs[f"daw/{name.removeprefix('daw_')}" if name.startswith("daw_") else f"loss/{name}"] = float(value)
    logs["grad_norm"] = float(grad_norm)
    logs["lr"] = float(optimizer.param_groups[0]["lr"])
    return logs


def save_step_checkpoint(ctx: StepContext, output_dir: Path, step: int, micro_step: int) -> Path:
    """Save the checkpoint of ``step`` (formats and pruning as ``config.checkpoint`` says); returns its folder."""
    config = ctx.config
    return save_checkpoint(
        ctx.accelerator,
        ctx.generator,
        output_dir,
        step=step,
        micro_step=micro_step,
        formats=config.checkpoint.formats,
        keep_last=config.checkpoint.keep_last,
        extra={"lora_rank": ctx.generator.lora_rank, "base": config.model.base, "seed": config.seed},
    )


def validate_step(ctx: StepContext, images: list, output_dir: Path, step: int, dtype: torch.dtype) -> dict[str, float]:
    """Upscale the validation images with the current generator, log and return their metrics."""
    from fidesr_core.settings import UpscaleSettings

    from .checkpoints import checkpoint_name
    from .validation import run_validation

    settings = UpscaleSettings(latent_mode=ctx.config.validation.latent_mode, color_fix=ctx.config.validation.color_fix)
    with ctx.accelerator.autocast() if dtype != torch.float32 else contextlib.nullcontext():
        metrics = run_validation(
            ctx.generator,
            ctx.prompts.cached(""),
            images,
            output_dir / "validation" / checkpoint_name(step),
            dtype=dtype,
            settings=settings,
            lpips_net=ctx.loss_fn.lpips_net,
        )
    ctx.accelerator.log({f"validation/{name}": value for name, value in metrics.items()}, step=step)
    logger.info("validation at step %d: %s", step, metrics)
    return metrics
