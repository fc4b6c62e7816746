"""The OpenCLIP → transformers CLIP text-encoder mapping used for SD 2.x single files (``open_clip_convert``),
checked against an OpenCLIP-style text tower written here, and the original-layout export the tests use.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from ldm_export import ldm_state_dict, text_encoder_to_open_clip, vae_to_ldm
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from fidesr_core.loading.open_clip_convert import clip_text_state_for, open_clip_to_clip_text
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.tiny import TINY_TEXT_CONFIG


class _OpenClipBlock(nn.Module):
    """OpenCLIP's residual attention block: pre-LN, packed in_proj attention, GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width))
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClipText(nn.Module):
    """OpenCLIP text tower; SD 2 reads the penultimate block's output through ln_final."""

    def __init__(self, vocab: int, context: int, width: int, heads: int, mlp_width: int, layers: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_OpenClipBlock(width, heads, mlp_width) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, width))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, ids: torch.Tensor, used_layers: int) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)  # causal
        for block in self.transformer.resblocks[:used_layers]:
            x = block(x, mask)
        return self.ln_final(x)


@torch.no_grad()
def test_open_clip_mapping_reproduces_the_open_clip_forward() -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(**TINY_TEXT_CONFIG)
    reference = _OpenClipText(
        config.vocab_size,
        77,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.num_hidden_layers + 1,
    ).eval()
    for parameter in reference.parameters():
        parameter.normal_(0.0, 0.3)
    state = {f"cond_stage_model.model.{key}": value for key, value in reference.state_dict().items()}
    converted = open_clip_to_clip_text(state, config.num_hidden_layers)
    model = CLIPTextModel(config).eval()
    model.load_state_dict(clip_text_state_for(model.state_dict(), converted), strict=False)
    assert all(
        torch.equal(model.state_dict()[key], value)
        for key, value in clip_text_state_for(model.state_dict(), converted).items()
    )
    missing = set(model.state_dict()) - set(clip_text_state_for(model.state_dict(), converted))
    assert all(key.endswith("position_ids") for key in missing)
    ids = torch.randint(1, config.vocab_size, (2, 77))
    expected = reference(ids, config.num_hidden_layers)
    got = model(ids).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(reference(ids, config.num_hidden_layers + 1), expected, atol=1e-3)  # last block matters


def test_open_clip_mapping_rejects_unknown_keys_and_too_few_blocks(tiny: BaseModel) -> None:
    state = text_encoder_to_open_clip(tiny.text_encoder, extra_layers=0)
    with pytest.raises(ValueError, match="2 transformer blocks"):
        open_clip_to_clip_text(state, num_layers=3)
    with pytest.raises(KeyError, match="resblocks.0.attn.mystery"):
        open_clip_to_clip_text(
            {**state, "cond_stage_model.model.transformer.resblocks.0.attn.mystery": torch.ones(1)}, 2
        )


def test_exported_layout_has_the_original_key_facts(tiny: BaseModel) -> None:
    state = ldm_state_dict(tiny)
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {
        "model",
        "first_stage_model",
        "cond_stage_model",
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
    }
    unet_keys = [key for key in state if key.startswith("model.diffusion_model.")]
    assert len(unet_keys) == len(tiny.unet.state_dict())
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 4
    assert state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # SD 2: linear proj_in
    vae = vae_to_ldm(tiny.vae)
    assert vae["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv as in the original
    blocks = {key.split(".")[4] for key in state if ".resblocks." in key}
    assert len(blocks) == TINY_TEXT_CONFIG["num_hidden_layers"] + 1
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
