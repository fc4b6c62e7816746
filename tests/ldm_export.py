"""Test helper: write diffusers/transformers SD 2-shaped models as an original (LDM) single-file checkpoint.

The layout is the one of Stability's SD 2.x releases: ``model.diffusion_model.*``
(U-Net with input_blocks / middle_block / output_blocks), ``first_stage_model.*``
(VAE with down/mid/up and 1x1-conv attention) and ``cond_stage_model.model.*``
(OpenCLIP text tower with packed in_proj, one more resblock than SD 2 uses,
plus text_projection and logit_scale), and the diffusion schedule buffers at
the top level.  Written from the layouts, independently of the loader, so a
round trip through ``load_base_model`` checks the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from fidesr_core.networks.model import BaseModel

__all__ = [
    "unet_to_ldm",
    "vae_to_ldm",
    "text_encoder_to_open_clip",
    "ldm_state_dict",
    "write_ldm_checkpoint",
    "write_config_folder",
    "write_diffusers_folder",
]

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, str], inner: dict[str, str] | None = None) -> dict:
    """Rename every key by its longest matching diffusers prefix; ``inner`` renames the first part after it."""
    out = {}
    for key, tensor in state.items():
        match = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        assert match is not None, f"no LDM name for {key}"
        rest = key[len(match) :]
        if inner:
            head, _, tail = rest.rpartition(".")
            rest = f"{inner.get(head, head)}.{tail}"
        out[prefixes[match] + rest] = tensor
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` keys for ``unet`` (same tensors)."""
    config = unet.config
    per_block = config.layers_per_block
    state = unet.state_dict()
    plain = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    resnets: dict[str, str] = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    plain["mid_block.attentions.0."] = "middle_block.1."
    last_down = len(config.down_block_types) - 1
    for i, block in enumerate(config.down_block_types):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            if "CrossAttn" in block:
                plain[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        if i < last_down:
            plain[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{1 + i * (per_block + 1) + per_block}.0.op."
    last_up = len(config.up_block_types) - 1
    for i, block in enumerate(config.up_block_types):
        has_attention = "CrossAttn" in block
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            if has_attention:
                plain[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
        if i < last_up:
            slot = 2 if has_attention else 1
            plain[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (per_block + 1) + per_block}.{slot}.conv."
    resnet_keys = {k: v for k, v in state.items() if any(k.startswith(p) for p in resnets)}
    other_keys = {k: v for k, v in state.items() if k not in resnet_keys}
    ldm = {**_rename(resnet_keys, resnets, _UNET_RESNET), **_rename(other_keys, plain)}
    return {"model.diffusion_model." + key: tensor for key, tensor in ldm.items()}


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """``first_stage_model.*`` keys for ``vae``; attention projections become 1x1 convs as in the original."""
    blocks = len(vae.config.block_out_channels)
    prefixes = {
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for part in ("encoder", "decoder"):
        prefixes.update(
            {
                f"{part}.conv_in.": f"{part}.conv_in.",
                f"{part}.conv_out.": f"{part}.conv_out.",
                f"{part}.conv_norm_out.": f"{part}.norm_out.",
                f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
                f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1.",
            }
        )
    for i in range(blocks):
        up = blocks - 1 - i  # the decoder's up blocks are numbered from the bottom in LDM
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{up}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    out = {}
    for key, tensor in _rename(vae.state_dict(), prefixes).items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key:
            head, _, tail = key.rpartition(".")
            stem, _, name = head.partition(".mid.attn_1.")
            key = f"{stem}.mid.attn_1.{_VAE_ATTENTION[name]}.{tail}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out["first_stage_model." + key] = tensor
    return out


def text_encoder_to_open_clip(
    text_encoder: CLIPTextModel, *, extra_layers: int = 1, seed: int = 1234
) -> dict[str, torch.Tensor]:
    """``cond_stage_model.model.*`` keys: packed q/k/v, ``extra_layers`` random unused blocks, contrastive head."""
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    state = {key: value for key, value in state.items() if not key.endswith("position_ids")}
    layers = text_encoder.config.num_hidden_layers
    hidden = text_encoder.config.hidden_size
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    generator = torch.Generator().manual_seed(seed)
    for i in range(layers + extra_layers):
        source = f"encoder.layers.{min(i, layers - 1)}."

        def get(name: str, index: int = i, source: str = source) -> torch.Tensor:
            tensor = state[source + name]
            return tensor if index < layers else torch.randn(tensor.shape, generator=generator)

        block = f"transformer.resblocks.{i}."
        for ours, theirs in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                out[f"{block}{ours}.{kind}"] = get(f"{theirs}.{kind}")
        for kind in ("weight", "bias"):
            parts = [get(f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    out["text_projection"] = torch.randn(hidden, hidden, generator=generator)
    out["logit_scale"] = torch.tensor(4.6052)
    return {"cond_stage_model.model." + key: tensor for key, tensor in out.items()}


def _schedule_buffers() -> dict[str, torch.Tensor]:
    """The LatentDiffusion schedule buffers every original SD checkpoint carries at the top level."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return {
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod.float(),
        "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float(),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
    }


def ldm_state_dict(base: BaseModel, *, extra_text_layers: int = 1) -> dict[str, torch.Tensor]:
    """The whole model in the original single-file layout."""
    return {
        **unet_to_ldm(base.unet),
        **vae_to_ldm(base.vae),
        **text_encoder_to_open_clip(base.text_encoder, extra_layers=extra_text_layers),
        **_schedule_buffers(),
    }


def write_ldm_checkpoint(
    base: BaseModel,
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    extra_text_layers: int = 1,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``base`` (or a given ``state``) as ``.safetensors`` or as a ``.ckpt``-style ``{"state_dict": ...}``."""
    state = state if state is not None else ldm_state_dict(base, extra_text_layers=extra_text_layers)
    state = {
        key: (value.to(dtype) if dtype is not None else value).contiguous().clone() for key, value in state.items()
    }
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state, "global_step": 110000, "epoch": 6}, path)
    return path


def write_config_folder(base: BaseModel, folder: Path) -> Path:
    """unet/, vae/ and text_encoder/ config.json of ``base`` (the ``config_dir`` layout)."""
    folder = Path(folder)
    base.unet.save_config(folder / "unet")
    base.vae.save_config(folder / "vae")
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    base.text_encoder.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    return folder


def write_diffusers_folder(base: BaseModel, folder: Path, *, prediction_type: str = "epsilon") -> Path:
    """``save_pretrained`` of each part plus model_index.json and a DDPM scheduler config."""
    folder = Path(folder)
    base.unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {
        "_class_name": "DDPMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder
