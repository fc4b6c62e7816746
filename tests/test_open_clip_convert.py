"""The OpenCLIP text tower of SD 2.x single files, converted by diffusers' ``convert_open_clip_checkpoint``
inside ``load_base_model``: checked tensor by tensor and forward against an OpenCLIP-style text tower written
here, and the original-layout export the tests use.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from ldm_export import (
    ldm_state_dict,
    text_encoder_to_open_clip,
    unet_to_ldm,
    vae_to_ldm,
    write_config_folder,
    write_ldm_checkpoint,
)
from torch import nn
from transformers import CLIPTextConfig

from fidesr_core.errors import BaseModelError
from fidesr_core.loading.base_model import load_base_model
from fidesr_core.networks.model import BaseModel
from fidesr_core.networks.tiny import TINY_TEXT_CONFIG

pytestmark = pytest.mark.usefixtures("no_network")
OPEN_CLIP = "cond_stage_model.model."


@pytest.fixture(scope="module")
def tiny_config_dir(tiny: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_folder(tiny, tmp_path_factory.mktemp("tiny_config"))


def _checkpoint_with_text(tiny: BaseModel, text_state: dict[str, torch.Tensor], path: Path) -> Path:
    """The tiny U-Net and VAE in the original layout with ``text_state`` (OpenCLIP names) as the text encoder."""
    state = {**unet_to_ldm(tiny.unet), **vae_to_ldm(tiny.vae), **text_state}
    return write_ldm_checkpoint(tiny, path, state=state)


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
def test_open_clip_text_tower_loads_tensor_for_tensor_and_reproduces_its_forward(
    tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(**TINY_TEXT_CONFIG)
    layers, width = config.num_hidden_layers, config.hidden_size
    reference = _OpenClipText(
        config.vocab_size, 77, width, config.num_attention_heads, config.intermediate_size, layers + 1
    ).eval()
    for parameter in reference.parameters():
        parameter.normal_(0.0, 0.3)
    open_clip = {OPEN_CLIP + key: value for key, value in reference.state_dict().items()}
    path = _checkpoint_with_text(tiny, open_clip, tmp_path / "open_clip.safetensors")
    model = load_base_model(path, config_dir=tiny_config_dir).text_encoder

    loaded = {key.removeprefix("text_model."): value for key, value in model.state_dict().items()}
    expected = {
        "embeddings.token_embedding.weight": reference.token_embedding.weight,
        "embeddings.position_embedding.weight": reference.positional_embedding,
        "final_layer_norm.weight": reference.ln_final.weight,
        "final_layer_norm.bias": reference.ln_final.bias,
    }
    for index, block in enumerate(reference.transformer.resblocks[:layers]):
        layer = f"encoder.layers.{index}."
        q, k, v = block.attn.in_proj_weight.chunk(3)  # OpenCLIP packs [q; k; v] along the output dimension
        q_bias, k_bias, v_bias = block.attn.in_proj_bias.chunk(3)
        for name, weight, bias in (("q_proj", q, q_bias), ("k_proj", k, k_bias), ("v_proj", v, v_bias)):
            expected[f"{layer}self_attn.{name}.weight"], expected[f"{layer}self_attn.{name}.bias"] = weight, bias
        for ours, module in (
            ("self_attn.out_proj", block.attn.out_proj),
            ("layer_norm1", block.ln_1),
            ("layer_norm2", block.ln_2),
            ("mlp.fc1", block.mlp.c_fc),
            ("mlp.fc2", block.mlp.c_proj),
        ):
            expected[f"{layer}{ours}.weight"], expected[f"{layer}{ours}.bias"] = module.weight, module.bias
    assert set(loaded) - set(expected) <= {"embeddings.position_ids"}
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())

    ids = torch.randint(1, config.vocab_size, (2, 77))
    wanted = reference(ids, layers)
    got = model(ids).last_hidden_state
    assert torch.allclose(got, wanted, atol=1e-5), (got - wanted).abs().max()
    assert not torch.allclose(reference(ids, layers + 1), wanted, atol=1e-3)  # the last block would matter


def test_open_clip_text_tower_with_blocks_missing_is_refused_and_extra_tensors_ignored(
    tiny: BaseModel, tiny_config_dir: Path, tmp_path: Path
) -> None:
    state = text_encoder_to_open_clip(tiny.text_encoder, extra_layers=0)
    last = f"{OPEN_CLIP}transformer.resblocks.{TINY_TEXT_CONFIG['num_hidden_layers'] - 1}."
    too_few = {key: value for key, value in state.items() if not key.startswith(last)}
    path = _checkpoint_with_text(tiny, too_few, tmp_path / "few.safetensors")
    with pytest.raises(
        BaseModelError, match=r"few\.safetensors: the text encoder weights do not match its config: \d+ missing"
    ):
        load_base_model(path, config_dir=tiny_config_dir)
    # A tensor the text encoder has no place for is left out, as diffusers' single-file loaders do.
    mystery = {**state, f"{OPEN_CLIP}transformer.resblocks.0.attn.mystery": torch.ones(1)}
    path = _checkpoint_with_text(tiny, mystery, tmp_path / "mystery.safetensors")
    loaded = load_base_model(path, config_dir=tiny_config_dir).text_encoder.state_dict()
    expected = tiny.text_encoder.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


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
