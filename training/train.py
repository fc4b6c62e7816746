"""Train or fine-tune FiDeSR (docs/algorithm.md §5).

    python -m training.train --config training/default_config.yaml --base SD21_BASE data.hq_folders=[DIR]
    accelerate launch -m training.train --config ... [overrides]          # several GPUs / nodes

One optimisation step = ``optim.gradient_accumulation`` micro-steps per process.
A micro-step: HQ crops -> Real-ESRGAN degradation on the device -> generator
(``training.generator``) -> ``L = λ·L2 + λ·LPIPS + λ·CSD`` with DAW
(``training.losses``) -> backward.  Every random draw of micro-step ``m`` on
process ``p`` comes from generators seeded by ``(seed, m, p)`` and the data order
is a function of the sample position (``training.data``), so a resumed run
continues exactly where the interrupted one stopped.

This module holds the run and the command line; the set-up it builds from the config is in
``training.run_setup`` and the pieces of a step are in ``training.training_loop``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fidesr_core.errors import FiDeSRError, SettingsError
from fidesr_core.networks.model import BaseModel

from .checkpoints import find_checkpoint, list_checkpoints, load_checkpoint, register_state_hooks
from .config import TrainConfig, config_to_dict, flat_scalars, load_config, save_config
from .data import HQCropDataset, StepBatchSampler, collect_records
from .degradation import DegradationConfig
from .generator import FiDeSRGenerator, PromptEncoder, build_generator, load_base, resolve_tokenizer
from .run_setup import (
    WEIGHT_DTYPES,
    build_loss,
    check_tokenizer,
    degradation_settings,
    load_validation_images,
    make_accelerator,
)
from .training_loop import (
    LOGGED_TERMS,
    StepContext,
    micro_step_loss,
    save_step_checkpoint,
    step_logs,
    validate_step,
)

__all__ = ["TrainResult", "build_parser", "train", "main"]

logger = logging.getLogger("training.train")


@dataclass
class TrainResult:
    output_dir: Path
    step: int  # optimiser steps done
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step of this run
    checkpoints: list[Path] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)
    generator: FiDeSRGenerator | None = None  # the trained networks (unwrapped), for programmatic use


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

    accelerator = make_accelerator(config)
    output_dir = Path(config.output_dir)
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    if config.optim.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if not config.resume and list_checkpoints(output_dir):
        raise SettingsError(
            f"{output_dir} already holds checkpoints: pass --resume latest to continue, or another --output-dir"
        )
    records = collect_records(
        config.data.hq_folders,
        config.data.hq_lists,
        captions=config.data.captions,
        sidecar_captions=config.data.sidecar_captions,
    )
    dataset = HQCropDataset(records, crop_size=config.data.crop_size, flip=config.data.flip, seed=config.seed)
    tokenizer = tokenizer if tokenizer is not None else resolve_tokenizer(config.model.tokenizer, config.model.base)
    check_tokenizer(config, tokenizer, dataset)
    degradation = DegradationConfig(**degradation_settings(config.data.degradation))

    base = base_model if base_model is not None else load_base(config.model.base)
    init_weights = None
    if config.model.init_weights:
        from fidesr_core.loading.weights import load_restorer_weights

        init_weights = load_restorer_weights(config.model.init_weights)
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
    loss_fn = build_loss(config, accelerator, lpips_net).to(accelerator.device)

    optim = config.optim
    optimizer = torch.optim.AdamW(
        generator.trainable_parameters(),
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_epsilon,
        weight_decay=optim.weight_decay,
    )
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
    validation_images = load_validation_images(config) if accelerator.is_main_process else []

    sampler = StepBatchSampler(
        batch_size=optim.batch_size,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        start_micro_step=micro_step,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
    )
    ctx = StepContext(config, accelerator, model, generator, prompts, loss_fn, degradation, csd_unet)
    result = TrainResult(output_dir=output_dir, step=step)
    bar = tqdm(
        total=optim.max_steps,
        initial=step,
        desc="steps",
        dynamic_ncols=True,
        disable=not (accelerator.is_local_main_process and config.logging.progress_bar),
    )
    batches = iter(loader)
    last_saved = step
    while step < optim.max_steps:
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        grad_norm = torch.zeros((), device=accelerator.device)
        for _ in range(optim.gradient_accumulation):
            with accelerator.accumulate(model):
                loss, terms = micro_step_loss(ctx, next(batches), step=step, micro_step=micro_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(generator.trainable_parameters(), optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            for name in LOGGED_TERMS:
                sums[name] = sums.get(name, 0) + terms[name].float() / optim.gradient_accumulation
        step += 1
        logs = step_logs(accelerator, sums, grad_norm, optimizer)
        logs["time/step_seconds"] = time.perf_counter() - started
        result.history.append({"step": float(step), **logs})
        bar.update(1)
        bar.set_postfix(
            loss=f"{logs['loss/total']:.4f}",
            l2=f"{logs['loss/l2']:.4f}",
            lpips=f"{logs['loss/lpips']:.4f}",
            csd=f"{logs['loss/csd']:.3g}",
        )
        if step % config.logging.every == 0 or step == optim.max_steps:
            accelerator.log(logs, step=step)
            if bar.disable and accelerator.is_main_process:  # without a bar (e.g. logging to a file) say it here
                logger.info(
                    "step %d/%d: loss %.4f (l2 %.4f, lpips %.4f, csd %.4g), %.2f s/step",
                    step,
                    optim.max_steps,
                    logs["loss/total"],
                    logs["loss/l2"],
                    logs["loss/lpips"],
                    logs["loss/csd"],
                    logs["time/step_seconds"],
                )
            if not math.isfinite(logs["loss/total"]):
                logger.warning("step %d: the loss is not finite (%s)", step, logs["loss/total"])
        if step % config.checkpoint.every == 0 or step == optim.max_steps:
            result.checkpoints.append(save_step_checkpoint(ctx, output_dir, step, micro_step))
            last_saved = step
        if config.validation.lq_folder and step % config.validation.every == 0:
            if accelerator.is_main_process:
                result.validations.append(validate_step(ctx, validation_images, output_dir, step, weight_dtype))
            accelerator.wait_for_everyone()
    if step != last_saved:
        result.checkpoints.append(save_step_checkpoint(ctx, output_dir, step, micro_step))
    bar.close()
    result.step = step
    result.generator = generator
    accelerator.end_training()
    return result


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
