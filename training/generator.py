"""The trainable FiDeSR generator and prompt encoding (docs/algorithm.md §5).

Frozen: the VAE, the text encoder and the base U-Net weights.  Trainable: the
three LoRA adapters on the U-Net (``fidesr_core.networks.lora``: same targets, names and
rank rule as the released trainer) and the whole LRRB.  One forward pass::

    z_L = SF · sample(VAE.enc(x_L))                 # frozen, no grad
    r   = U-Net_LoRA(z_L, t = 1, prompt)
    Δr  = LRRB(cat[z_L, r]);   z = z_L − (r + Δr)
    x̂   = clamp(VAE.dec(z / SF), −1, 1)             # frozen weights, gradient flows into z

The CSD term needs the frozen SD U-Net; :meth:`FiDeSRGenerator.frozen_predictor`
gives the same U-Net with its adapters switched off (no second copy in memory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel

from fidesr_core.errors import ModelFileError, SettingsError, WeightsFileError
from fidesr_core.loading.clip_tokenizer import prompt_ids
from fidesr_core.networks.families import LoraSet, RestorerWeights
from fidesr_core.networks.lora import (
    ADAPTER_NAMES,
    add_lora_adapters,
    load_lora_state,
    lora_state_dict,
    lora_target_modules,
)
from fidesr_core.networks.lrrb import LRRB
from fidesr_core.networks.model import SCALING_FACTOR, BaseModel
from fidesr_core.networks.text_embedding import batch_prompt_embedding
from fidesr_core.ops.restoration import RESIDUAL_TIMESTEP

from .csd import frozen_unet

__all__ = [
    "GeneratorOutput",
    "FiDeSRGenerator",
    "build_generator",
    "PromptEncoder",
    "load_tokenizer",
    "load_base",
    "resolve_tokenizer",
    "TOKENIZER_HINT",
]

logger = logging.getLogger(__name__)

TOKENIZER_HINT = (
    "pass --tokenizer FOLDER (a folder with the CLIP vocab.json and merges.txt, e.g. the tokenizer/ folder of "
    "an SD 2.1-base diffusers folder), or use a diffusers folder as the base model"
)


class GeneratorOutput(NamedTuple):
    image: torch.Tensor  # x̂ [B, 3, H, W] in [-1, 1]
    latent: torch.Tensor  # z [B, 4, H/8, W/8]
    lq_latent: torch.Tensor  # z_L [B, 4, H/8, W/8], no grad


def _frozen_dtype(module: nn.Module) -> torch.dtype:
    """dtype of the module's base (non-LoRA) weights."""
    for name, parameter in module.named_parameters():
        if "lora" not in name:
            return parameter.dtype
    return torch.float32


class FiDeSRGenerator(nn.Module):
    """U-Net with the three LoRA adapters, LRRB, and the frozen VAE; ``forward`` is one training pass."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        lrrb: LRRB,
        *,
        target_modules: Mapping[str, Sequence[str]],
        lora_rank: int,
        latent_sampling: str = "sample",
        scaling_factor: float = SCALING_FACTOR,
    ) -> None:
        super().__init__()
        if latent_sampling not in ("sample", "mode"):
            raise SettingsError(f"latent_sampling must be 'sample' or 'mode', got {latent_sampling!r}")
        self.unet = unet
        self.vae = vae
        self.lrrb = lrrb
        self.target_modules = {name: list(modules) for name, modules in target_modules.items()}
        self.lora_rank = int(lora_rank)
        self.latent_sampling = latent_sampling
        self.scaling_factor = float(scaling_factor)

    # ----------------------------------------------------------------- modes and parameters

    def train(self, mode: bool = True) -> FiDeSRGenerator:
        """U-Net and LRRB follow ``mode``; the frozen VAE always stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """LoRA tensors of the U-Net (``unet.…lora…``) and every LRRB tensor (``lrrb.…``), in a fixed order."""
        for name, parameter in self.unet.named_parameters():
            if "lora" in name:
                yield f"unet.{name}", parameter
        for name, parameter in self.lrrb.named_parameters():
            yield f"lrrb.{name}", parameter

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for _, parameter in self.trainable_named_parameters()]

    def freeze_base(self) -> None:
        """Only LoRA and LRRB tensors require grad."""
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(False)
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(True)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Cast the frozen VAE and base U-Net weights to ``dtype``; LoRA and LRRB stay float32."""
        self.vae.to(dtype)
        self.unet.to(dtype)
        for parameter in self.trainable_parameters():
            parameter.data = parameter.data.float()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute U-Net and VAE-decoder activations in the backward pass (less memory, ~30% slower)."""
        self.unet.enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()

    def frozen_predictor(self) -> AbstractContextManager:
        """Context manager yielding the U-Net with the LoRA adapters disabled (the CSD teacher)."""
        return frozen_unet(self.unet)

    # ----------------------------------------------------------------- the pass

    @torch.no_grad()
    def encode_lq(self, lq: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z_L = SF · latent`` of ``lq`` ``[B, 3, H, W]`` in [-1, 1] -> ``[B, 4, H/8, W/8]`` float32.

        Sampling draws float32 noise from ``generator`` (on its own device), so the
        draw does not depend on the VAE's dtype.
        """
        vae_dtype = _frozen_dtype(self.vae)
        moments = self.vae.encode(lq.to(vae_dtype)).latent_dist
        mean = moments.mean.float()
        if self.latent_sampling == "mode":
            return mean * self.scaling_factor
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
        return (mean + moments.std.float() * noise) * self.scaling_factor

    def forward(
        self, lq: torch.Tensor, prompt_embeds: torch.Tensor, generator: torch.Generator | None = None
    ) -> GeneratorOutput:
        """One generator pass on ``lq`` ``[B, 3, H, W]`` in [-1, 1] with ``prompt_embeds`` ``[B or 1, 77, D]``."""
        z_lq = self.encode_lq(lq, generator)  # [B, 4, h, w]
        batch = z_lq.shape[0]
        prompt_embeds = batch_prompt_embedding(prompt_embeds, batch)
        unet_dtype = _frozen_dtype(self.unet)
        timestep = torch.full((batch,), RESIDUAL_TIMESTEP, device=z_lq.device, dtype=torch.long)
        residual = self.unet(
            z_lq.to(unet_dtype), timestep, encoder_hidden_states=prompt_embeds.to(unet_dtype)
        ).sample.float()  # r
        correction = self.lrrb(torch.cat([z_lq, residual], dim=1)).float()  # Δr
        latent = z_lq - (residual + correction)  # z
        vae_dtype = _frozen_dtype(self.vae)
        image = self.vae.decode((latent / self.scaling_factor).to(vae_dtype)).sample.float().clamp(-1.0, 1.0)
        return GeneratorOutput(image=image, latent=latent, lq_latent=z_lq)

    # ----------------------------------------------------------------- weights

    def export_weights(self, metadata: Mapping[str, str] | None = None) -> RestorerWeights:
        """The current LoRA and LRRB as FiDeSR ``RestorerWeights`` (float32 CPU copies)."""
        lora = LoraSet(
            self.lora_rank,
            {name: list(modules) for name, modules in self.target_modules.items()},
            {k: v.detach().float().cpu().clone() for k, v in lora_state_dict(self.unet).items()},
        )
        return RestorerWeights(
            "fidesr",
            {"unet": lora},
            lrrb_state={k: v.detach().float().cpu().clone() for k, v in self.lrrb.state_dict().items()},
            metadata=dict(metadata or {}),
        )

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name (float32 CPU copies), for the exact-resume state."""
        return {name: parameter.detach().float().cpu().clone() for name, parameter in self.trainable_named_parameters()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state`; names and shapes must match exactly."""
        own = dict(self.trainable_named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ModelFileError(
                f"training state does not fit this generator: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it written with another LoRA rank or base?"
            )
        with torch.no_grad():
            for name, parameter in own.items():
                if tuple(state[name].shape) != tuple(parameter.shape):
                    raise ModelFileError(
                        f"training state tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(parameter.shape)}"
                    )
                parameter.copy_(state[name].to(parameter.device, parameter.dtype))


def _check_targets(weights: RestorerWeights, unet: UNet2DConditionModel, source: str) -> None:
    if weights.family != "fidesr":
        raise WeightsFileError(f"{source} holds {weights.family} weights; the trainer continues from FiDeSR's")
    targets = weights.lora["unet"].target_modules
    unknown = sorted(set(targets) - set(ADAPTER_NAMES))
    if unknown:
        raise WeightsFileError(f"{source}: adapter names {unknown} are not FiDeSR's {ADAPTER_NAMES}")
    modules = dict(unet.named_modules())
    absent = [name for group in targets.values() for name in group if name not in modules]
    if absent:
        raise WeightsFileError(
            f"{source}: {len(absent)} LoRA target modules (e.g. {absent[0]}) do not exist in the base U-Net; "
            "FiDeSR weights need Stable Diffusion 2.1-base"
        )


def build_generator(
    base: BaseModel,
    *,
    lora_rank: int = 8,
    init_weights: RestorerWeights | None = None,
    latent_sampling: str = "sample",
) -> FiDeSRGenerator:
    """Wrap ``base``'s U-Net (adapters are added to it in place) and VAE into a trainable generator.

    New adapters start as peft's ``gaussian`` init (A ~ N(0, 1/r), B = 0) from the global
    torch RNG, and the LRRB as docs/algorithm.md §3 (its output starts at exactly 0).  With
    ``init_weights`` (e.g. the authors' ``fidesr.pkl``) the adapters take its targets,
    rank and tensors and the LRRB its state, so training continues from the released model.
    """
    unet, vae = base.unet, base.vae
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    source = (init_weights.metadata.get("path", "the FiDeSR weights")) if init_weights is not None else ""
    if init_weights is not None:
        _check_targets(init_weights, unet, source)
        init_lora = init_weights.lora["unet"]
        if init_lora.rank != lora_rank:
            logger.warning("%s has LoRA rank %d; using it instead of %d", source, init_lora.rank, lora_rank)
        targets, rank = init_lora.target_modules, init_lora.rank
    else:
        targets, rank = lora_target_modules(unet), lora_rank
    add_lora_adapters(unet, targets, rank=rank, init_lora_weights="gaussian")
    lrrb = LRRB(latent_channels=unet.config.in_channels)
    if init_weights is not None:
        try:
            load_lora_state(unet, init_weights.lora["unet"].state)
            lrrb.load_state_dict(init_weights.lrrb_state)
        except (KeyError, ValueError, RuntimeError) as error:
            raise WeightsFileError(f"{source} does not fit the base model {base.source}: {error}") from error
    generator = FiDeSRGenerator(
        unet, vae, lrrb, target_modules=targets, lora_rank=rank, latent_sampling=latent_sampling
    )
    generator.freeze_base()
    return generator


# --------------------------------------------------------------------------- loading


def load_base(spec: str) -> BaseModel:
    """SD 2.1-base from a diffusers folder or single file; ``tiny`` / ``tiny:SEED`` is the tiny random test model."""
    if spec == "tiny" or spec.startswith("tiny:"):
        from fidesr_core.networks.tiny import tiny_base_model

        return tiny_base_model(int(spec.partition(":")[2] or 0))
    if not spec:
        raise SettingsError("no base model: set model.base / --base to SD 2.1-base (diffusers folder or single file)")
    from fidesr_core.loading.base_model import load_base_model

    return load_base_model(spec)


def resolve_tokenizer(tokenizer: str | None, base: str):
    """The tokenizer folder if given, else ``BASE/tokenizer`` of a diffusers base folder, else None."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    folder = Path(base).expanduser() if base and base != "tiny" and not base.startswith("tiny:") else None
    if folder is not None and folder.is_file() and folder.name == "model_index.json":
        folder = folder.parent
    if folder is not None and (folder / "tokenizer").is_dir():
        return load_tokenizer(folder / "tokenizer")
    return None


# --------------------------------------------------------------------------- prompts


def load_tokenizer(path: str | os.PathLike):
    """A CLIP tokenizer from a folder (vocab.json + merges.txt or tokenizer.json), padding with "!" as SD 2."""
    from transformers import CLIPTokenizer

    folder = Path(path).expanduser()
    has_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not folder.is_dir() or not (has_files or (folder / "tokenizer.json").is_file()):
        raise ModelFileError(f"tokenizer folder {folder} must hold vocab.json and merges.txt (or tokenizer.json)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelFileError(f"tokenizer folder {folder} cannot be read as a CLIP tokenizer: {error}") from error
    if tokenizer.pad_token != "!":
        # SD 2's OpenCLIP text encoder was trained with id-0 ("!") padding (docs/algorithm.md §2.2)
        logger.info("tokenizer %s pads with %r; using '!' as SD 2 does", folder, tokenizer.pad_token)
        tokenizer.pad_token = "!"
    return tokenizer


class PromptEncoder:
    """Prompt strings -> text-encoder embeddings ``[B, 77, D]`` (float32, no grad).

    ``""`` needs no tokenizer of the caller's (the package ships SD 2's); any other prompt does.  Embeddings of repeated prompts (the empty and negative ones) are cached.
    """

    def __init__(self, text_encoder: CLIPTextModel, tokenizer=None, *, cache_size: int = 8) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.length = int(text_encoder.config.max_position_embeddings)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_size = cache_size

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[len(prompts), 77]`` token ids; raises ``SettingsError`` for a non-empty prompt without tokenizer."""
        rows = []
        for prompt in prompts:
            if not prompt:
                rows.append(prompt_ids("", length=self.length))  # the tokenizer shipped with the package
                continue
            if self.tokenizer is None:
                raise SettingsError(f"the prompt {prompt[:40]!r} needs a CLIP tokenizer: {TOKENIZER_HINT}")
            ids = self.tokenizer(
                [prompt], padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
            ).input_ids
            rows.append(ids)
        return torch.cat(rows).long()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.token_ids(prompts).to(self.device)
        return self.text_encoder(input_ids=ids).last_hidden_state.float()

    def cached(self, prompt: str) -> torch.Tensor:
        """``[1, 77, D]`` embedding of one prompt, computed once."""
        if prompt not in self._cache:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[prompt] = self.encode([prompt])
        return self._cache[prompt]
