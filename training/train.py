"""Train or fine-tune FiDeSR (SPEC §5).

    python -m training.train --config training/default_config.yaml --base SD21_BASE data.hq_folders=[DIR]
    accelerate launch -m training.train --config ... [overrides]          # several GPUs / nodes

One optimisation step = ``optim.gradient_accumulation`` micro-steps per process.
A micro-step: HQ crops -> Real-ESRGAN degradation on the device -> generator
(``training.generator``) -> ``L = λ·L2 + λ·LPIPS + λ·CSD`` with DAW
(``training.losses``) -> backward.  Every random draw of micro-step ``m`` on
process ``p`` comes from generators seeded by ``(seed, m, p)`` and the data order
is a function of the sample position (``training.data``), so a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fidesr_core.errors import FiDeSRError, SettingsError
from fidesr_core.model import BaseModel

from .checkpoints import find_checkpoint, list_checkpoints, load_checkpoint, register_state_hooks, save_checkpoint
from .config import TrainConfig, config_to_dict, flat_scalars, load_config, save_config
from .csd import NEGATIVE_PROMPT, ClassifierScoreDistillation
from .data import HQCropDataset, StepBatchSampler, collect_records, derive_seed
from .degradation import DegradationConfig, degrade, make_generator
from .generator import TOKENIZER_HINT, FiDeSRGenerator, PromptEncoder, build_generator, load_base, resolve_tokenizer

__all__ = ["TrainResult", "build_parser", "train", "main"]

logger = logging.getLogger("training.train")

_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LOGGED_TERMS = ("total", "l2", "lpips", "csd", "daw_alpha", "daw_weight_max", "daw_weight_min")


@dataclass
class TrainResult:
    output_dir: Path
    step: int  # optimiser steps done
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step of this run
    checkpoints: list[Path] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    generator: FiDeSRGenerator | None = None  # the trained networks (unwrapped), for programmatic use


# --------------------------------------------------------------------------- set-up


def _check_tokenizer(config: TrainConfig, tokenizer, dataset: HQCropDataset) -> None:
    reasons = []
    if config.loss.lambda_csd > 0:
        reasons.append("CSD needs the negative prompt")
    if dataset.has_captions and config.data.caption_dropout < 1.0:
        reasons.append("the training images have captions")
    if reasons and tokenizer is None:
        raise SettingsError(f"a CLIP tokenizer is needed ({'; '.join(reasons)}) but none was found: {TOKENIZER_HINT}")


def _build_loss(config: TrainConfig, accelerator, lpips_net: torch.nn.Module | None):
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
        _Autocast(lpips_net, accelerator), csd, lambda_l2=loss.lambda_l2, lambda_lpips=loss.lambda_lpips, lambda_csd=loss.lambda_csd,
        daw_start=loss.daw_start, daw_ramp=loss.daw_ramp, daw_alpha_max=loss.daw_alpha, daw_w_max=loss.daw_w_max,
        perceptual_mix=loss.daw_perceptual_mix,
    )  # fmt: skip


def _make_accelerator(config: TrainConfig):
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


# --------------------------------------------------------------------------- one micro-step


@dataclass
class _StepContext:
    config: TrainConfig
    accelerator: object
    model: torch.nn.Module  # the prepared (possibly DDP-wrapped) generator
    generator: FiDeSRGenerator  # unwrapped
    prompts: PromptEncoder
    loss_fn: torch.nn.Module
    degradation: DegradationConfig
    csd_unet: torch.nn.Module | None


def _micro_step(ctx: _StepContext, batch: dict, *, step: int, micro_step: int) -> tuple[torch.Tensor, dict]:
    """Forward and loss of one micro-batch; returns ``(loss, terms)``."""
    accelerator, config = ctx.accelerator, ctx.config
    device, process = accelerator.device, accelerator.process_index
    hq = batch["hq"].to(device, non_blocking=True)  # [B, 3, S, S] in [0, 1]
    lq = degrade(hq, config=ctx.degradation, generator=make_generator(derive_seed(config.seed, 2, micro_step, process), device))  # fmt: skip
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
        output.image, hq * 2 - 1, output.latent, step=step, predictor=_autocast_teacher(accelerator, teacher),
        positive_embeds=caption_embeds, negative_embeds=negative, generator=draws,
    )  # fmt: skip


class _Autocast(torch.nn.Module):
    """Runs the wrapped network under the accelerator's autocast (a no-op without mixed precision)."""

    def __init__(self, inner: torch.nn.Module, accelerator) -> None:
        super().__init__()
        self.inner = inner
        self._accelerator = accelerator

    def forward(self, *args, **kwargs):
        with self._accelerator.autocast():
            return self.inner(*args, **kwargs)


@contextlib.contextmanager
def _autocast_teacher(accelerator, teacher):
    """Yield a noise predictor calling ``teacher`` (a U-Net or a context manager yielding one) under autocast."""
    opened = teacher if hasattr(teacher, "__enter__") else contextlib.nullcontext(teacher)
    with opened as unet:

        def predict(*args, **kwargs):
            with accelerator.autocast():
                return unet(*args, **kwargs)

        yield predict


# --------------------------------------------------------------------------- the run


def train(
    config: TrainConfig,
    *,
    base_model: BaseModel | None = None,
    tokenizer=None,
    lpips_net: torch.nn.Module | None = None,
) -> TrainResult:
    """Run (or resume) training as ``config`` says.

    ``base_model``, ``tokenizer`` and ``lpips_net`` (a frozen spatial LPIPS, ``(x, y) -> [B, 1, H, W]``)
    replace loading them from the config (tests, notebooks).  ``base_model`` is consumed: the
    adapters are added to its U-Net in place.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = _make_accelerator(config)
    output_dir = Path(config.output_dir)
    weight_dtype = _WEIGHT_DTYPES[accelerator.mixed_precision]
    if config.optim.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if not config.resume and list_checkpoints(output_dir):
        raise SettingsError(
            f"{output_dir} already holds checkpoints: pass --resume latest to continue, or another --output-dir"
        )
    records = collect_records(
        config.data.hq_folders, config.data.hq_lists,
        captions=config.data.captions, sidecar_captions=config.data.sidecar_captions,
    )  # fmt: skip
    dataset = HQCropDataset(records, crop_size=config.data.crop_size, flip=config.data.flip, seed=config.seed)
    tokenizer = tokenizer if tokenizer is not None else resolve_tokenizer(config.model.tokenizer, config.model.base)
    _check_tokenizer(config, tokenizer, dataset)
    degradation = DegradationConfig(**_tuples(config.data.degradation))

    base = base_model if base_model is not None else load_base(config.model.base)
    init_weights = None
    if config.model.init_weights:
        from fidesr_core.weights import load_fidesr_weights

        init_weights = load_fidesr_weights(config.model.init_weights)
        init_weights.metadata.setdefault("path", str(config.model.init_weights))
    set_seed(config.seed)  # the LoRA init draws from the global RNG
    generator = build_generator(
        base, lora_rank=config.model.lora_rank, init_weights=init_weights, latent_sampling=config.model.latent_sampling
    )
    if config.optim.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
    text_encoder = base.text_encoder.requires_grad_(False).eval()
    if config.optim.cast_frozen_weights and weight_dtype != torch.float32:
        generator.cast_frozen(weight_dtype)
        text_encoder.to(weight_dtype)
    generator.to(accelerator.device)
    prompts = PromptEncoder(text_encoder.to(accelerator.device), tokenizer)
    csd_unet = None
    if config.model.csd_model and config.loss.lambda_csd > 0:
        csd_unet = load_base(config.model.csd_model).unet.requires_grad_(False).eval()
        csd_unet.to(accelerator.device, weight_dtype if config.optim.cast_frozen_weights else torch.float32)
    loss_fn = _build_loss(config, accelerator, lpips_net).to(accelerator.device)

    optim = config.optim
    optimizer = torch.optim.AdamW(
        generator.trainable_parameters(), lr=optim.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon, weight_decay=optim.weight_decay,
    )  # fmt: skip
    generator.train()
    model, optimizer = accelerator.prepare(generator, optimizer)
    register_state_hooks(accelerator, generator)

    step = micro_step = 0
    if config.resume:
        folder = find_checkpoint(output_dir, config.resume)
        if folder is None:
            logger.info("no checkpoint in %s to resume from; starting at step 0", output_dir)
        else:
            state = load_checkpoint(accelerator, folder)
            step, micro_step = state.step, state.micro_step
            logger.info("resumed from %s at step %d", folder, step)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        accelerator.init_trackers("fidesr", config=flat_scalars(config_to_dict(config)))
    validation_images = _validation_images(config) if accelerator.is_main_process else []

    sampler = StepBatchSampler(
        batch_size=optim.batch_size, num_processes=accelerator.num_processes,
        process_index=accelerator.process_index, start_micro_step=micro_step,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=config.data.num_workers > 0,
    )  # fmt: skip
    ctx = _StepContext(config, accelerator, model, generator, prompts, loss_fn, degradation, csd_unet)
    result = TrainResult(output_dir=output_dir, step=step)
    bar = tqdm(
        total=optim.max_steps, initial=step, desc="steps", dynamic_ncols=True,
        disable=not (accelerator.is_local_main_process and config.logging.progress_bar),
    )  # fmt: skip
    batches = iter(loader)
    last_saved = step
    while step < optim.max_steps:
        sums: dict[str, torch.Tensor] = {}
        grad_norm = torch.zeros((), device=accelerator.device)
        for _ in range(optim.gradient_accumulation):
            with accelerator.accumulate(model):
                loss, terms = _micro_step(ctx, next(batches), step=step, micro_step=micro_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(generator.trainable_parameters(), optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            for name in _LOGGED_TERMS:
                sums[name] = sums.get(name, 0) + terms[name].float() / optim.gradient_accumulation
        step += 1
        logs = _step_logs(accelerator, sums, grad_norm, optimizer)
        result.history.append({"step": float(step), **logs})
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss/total']:.4f}", l2=f"{logs['loss/l2']:.4f}", lpips=f"{logs['loss/lpips']:.4f}", csd=f"{logs['loss/csd']:.3g}")  # fmt: skip
        if step % config.logging.every == 0 or step == optim.max_steps:
            accelerator.log(logs, step=step)
            if not math.isfinite(logs["loss/total"]):
                logger.warning("step %d: the loss is not finite (%s)", step, logs["loss/total"])
        if step % config.checkpoint.every == 0 or step == optim.max_steps:
            result.checkpoints.append(_save(ctx, output_dir, step, micro_step))
            last_saved = step
        if config.validation.lq_folder and step % config.validation.every == 0:
            if accelerator.is_main_process:
                result.validations.append(_validate(ctx, validation_images, output_dir, step, weight_dtype))
            accelerator.wait_for_everyone()
    if step != last_saved:
        result.checkpoints.append(_save(ctx, output_dir, step, micro_step))
    bar.close()
    result.step = step
    result.generator = generator
    accelerator.end_training()
    return result


def _tuples(values: dict) -> dict:
    """YAML lists -> tuples for the frozen DegradationConfig."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


def _step_logs(accelerator, sums: dict[str, torch.Tensor], grad_norm, optimizer) -> dict[str, float]:
    names = list(sums)
    values = torch.stack([sums[name].to(accelerator.device) for name in names])
    values = accelerator.reduce(values, reduction="mean") if accelerator.num_processes > 1 else values
    logs = {}
    for name, value in zip(names, values.tolist(), strict=True):
        logs[f"daw/{name.removeprefix('daw_')}" if name.startswith("daw_") else f"loss/{name}"] = float(value)
    logs["grad_norm"] = float(grad_norm)
    logs["lr"] = float(optimizer.param_groups[0]["lr"])
    return logs


def _save(ctx: _StepContext, output_dir: Path, step: int, micro_step: int) -> Path:
    config = ctx.config
    return save_checkpoint(
        ctx.accelerator, ctx.generator, output_dir, step=step, micro_step=micro_step,
        formats=config.checkpoint.formats, keep_last=config.checkpoint.keep_last,
        extra={"lora_rank": ctx.generator.lora_rank, "base": config.model.base, "seed": config.seed},
    )  # fmt: skip


def _validation_images(config: TrainConfig) -> list:
    if not config.validation.lq_folder:
        return []
    from .validation import collect_validation_images

    return collect_validation_images(
        config.validation.lq_folder, config.validation.hq_folder, max_images=config.validation.max_images
    )


def _validate(ctx: _StepContext, images: list, output_dir: Path, step: int, dtype: torch.dtype) -> dict[str, float]:
    from fidesr_core.pipeline import UpscaleSettings

    from .checkpoints import checkpoint_name
    from .validation import run_validation

    settings = UpscaleSettings(latent_mode=ctx.config.validation.latent_mode, color_fix=ctx.config.validation.color_fix)
    with ctx.accelerator.autocast() if dtype != torch.float32 else contextlib.nullcontext():
        metrics = run_validation(
            ctx.generator, ctx.prompts.cached(""), images, output_dir / "validation" / checkpoint_name(step),
            dtype=dtype, settings=settings, lpips_net=ctx.loss_fn.lpips_net,
        )  # fmt: skip
    ctx.accelerator.log({f"validation/{name}": value for name, value in metrics.items()}, step=step)
    logger.info("validation at step %d: %s", step, metrics)
    return metrics


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train or fine-tune FiDeSR. Settings come from --config (YAML/TOML; defaults = the paper's run), "
        "then the flags below, then section.key=value overrides.",
    )
    parser.add_argument("--config", help="YAML or TOML config file (default: the built-in paper settings)")
    parser.add_argument("--output-dir", help="run folder (checkpoints/, validation/, logs/)")
    parser.add_argument("--base", help="SD 2.1-base: diffusers folder or single .safetensors/.ckpt file")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (vocab.json + merges.txt) for a single-file base")
    parser.add_argument("--resume", help="'latest' (newest checkpoint of --output-dir) or a checkpoint folder")
    parser.add_argument("--init-weights", help="FiDeSR weights (.pkl or .safetensors) to fine-tune from")
    parser.add_argument("--csd-model", help="another SD 2.x model as the CSD teacher (default: base U-Net, LoRA off)")
    parser.add_argument("--max-steps", type=int, help="total optimisation steps")
    parser.add_argument("--batch-size", type=int, help="crops per process and micro-step")
    parser.add_argument("--gradient-accumulation", type=int, help="micro-steps per optimisation step")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--seed", type=int)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.learning_rate=1e-4")
    return parser


_FLAG_KEYS = {
    "output_dir": "output_dir", "base": "model.base", "tokenizer": "model.tokenizer", "resume": "resume",
    "init_weights": "model.init_weights", "csd_model": "model.csd_model", "max_steps": "optim.max_steps",
    "batch_size": "optim.batch_size", "gradient_accumulation": "optim.gradient_accumulation",
    "mixed_precision": "optim.mixed_precision", "gradient_checkpointing": "optim.gradient_checkpointing", "seed": "seed",
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    extra = {key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag) is not None}
    try:
        config = load_config(args.config, args.overrides, extra=extra)
        result = train(config)
    except FiDeSRError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info("finished at step %d; checkpoints: %s", result.step, [str(p) for p in result.checkpoints])
    return 0


if __name__ == "__main__":
    sys.exit(main())
