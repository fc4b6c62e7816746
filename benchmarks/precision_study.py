"""Where half precision loses accuracy: the full-size SD 2.1-base VAE decoder, encoder or U-Net (random
weights) in fp32, fp16, bf16 and bf16 with chosen layer kinds kept in fp32, compared with fp32.

A layer kind kept in fp32 runs with float32 weights on its input cast up; its output is cast back
to the half type (so the rest of the network is unchanged). Prints one JSON line per variant:
PSNR and max |diff| against fp32 (outputs mapped to [0, 1] for the decoder), and seconds.

    python benchmarks/precision_study.py --part decoder --size 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base"


def _build(part: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    if part == "unet":
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet")).eval()
    return AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae")).eval()


def _kinds(model: nn.Module, kind: str) -> list[nn.Module]:
    """Modules of one kind: groupnorm, attention, conv_out (the last convolution), conv_in, resnet, linear."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if kind == "groupnorm":
        return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    if kind == "attention":
        return [m for m in model.modules() if isinstance(m, Attention)]
    if kind == "conv_out":
        return [m for name, m in model.named_modules() if name.endswith("conv_out") or name.endswith("conv_norm_out")]
    if kind == "conv_in":
        return [m for name, m in model.named_modules() if name.endswith("conv_in") or name == "post_quant_conv"]
    if kind == "resnet":
        return [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    if kind == "linear":
        return [m for m in model.modules() if isinstance(m, nn.Linear)]
    raise SystemExit(f"unknown kind {kind}")


def _keep_in_fp32(modules: list[nn.Module], half: torch.dtype) -> None:
    def cast_in(module, args, kwargs):
        cast = lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def cast_out(module, args, kwargs, output):
        if torch.is_tensor(output):
            return output.to(half)
        return output

    for module in modules:
        module.float()
        module.register_forward_pre_hook(cast_in, with_kwargs=True)
        module.register_forward_hook(cast_out, with_kwargs=True)


def _round_weights(model: nn.Module, half: torch.dtype) -> None:
    """fp32 model whose convolution and linear weights carry the half type's rounding (weight error alone)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(half).float()


def _round_inputs(model: nn.Module, half: torch.dtype) -> None:
    """fp32 model whose convolutions and linears see inputs rounded to the half type (activation error alone)."""

    def round_in(module, args):
        return tuple(a.to(half).float() if torch.is_tensor(a) else a for a in args)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_pre_hook(round_in)


def _half_matmuls(model: nn.Module, half: torch.dtype, split: int) -> None:
    """fp32 model whose convolutions and linears run in the half type (input and weights cast, output back to
    fp32): the residual stream, norms, activations and attention softmax stay fp32. ``split`` 2: the weight
    as ``hi + lo`` halves, two half-precision products (the weight's rounding removed); 3: the input split
    too, three products (hi·hi + hi·lo + lo·hi, about fp32's accuracy)."""
    import torch.nn.functional as F

    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        weight = module.weight.data
        layout = torch.channels_last if weight.dim() == 4 else torch.contiguous_format
        high = weight.to(half).contiguous(memory_format=layout)
        low = (weight - high.float()).to(half).contiguous(memory_format=layout) if split >= 2 else None
        bias = None if module.bias is None else module.bias.data

        def forward(x, module=module, high=high, low=low, bias=bias):
            def op(inputs, w):
                if isinstance(module, nn.Conv2d):
                    return F.conv2d(inputs, w, None, module.stride, module.padding, module.dilation, module.groups)
                return F.linear(inputs, w)

            x_high = x.to(half)
            out = op(x_high, high).float()
            if low is not None:
                out += op(x_high, low).float()
            if split >= 3:
                out += op((x - x_high.float()).to(half), high).float()
            return out if bias is None else out + (bias[:, None, None] if isinstance(module, nn.Conv2d) else bias)

        module.forward = forward


def _run(part: str, model: nn.Module, size: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if part == "decoder":
            latents = torch.randn(1, 4, size, size, generator=generator).to(dtype)
            return ((model.decode(latents).sample.float().clamp(-1, 1) + 1) / 2).float()
        if part == "encoder":
            pixels = (torch.rand(1, 3, 8 * size, 8 * size, generator=generator) * 2 - 1).to(dtype)
            return model.encode(pixels).latent_dist.mean.float()
        latents = torch.randn(1, 4, size, size, generator=generator).to(dtype)
        embedding = torch.randn(1, 77, 1024, generator=generator).to(dtype)
        return model(latents, 1, encoder_hidden_states=embedding).sample.float()


def _distance(value: torch.Tensor, reference: torch.Tensor) -> dict:
    span = float(reference.max() - reference.min()) or 1.0
    mse = float(((value - reference) ** 2).mean())
    return {
        "psnr_db": round(10 * torch.log10(torch.tensor(span**2 / max(mse, 1e-30))).item(), 2),
        "max_abs_diff": round(float((value - reference).abs().max()) / span, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="decoder", choices=("decoder", "encoder", "unet"))
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument(
        "--variants",
        default="fp16,bf16,bf16+groupnorm,bf16+attention,bf16+conv_out,bf16+conv_in,bf16+groupnorm+attention",
    )
    args = parser.parse_args()
    from fidesr_core.loading.restorer import use_channels_last

    base = _build(args.part)
    start = time.perf_counter()
    reference = _run(args.part, base, args.size, torch.float32)
    print(json.dumps({"variant": "fp32", "seconds": round(time.perf_counter() - start, 2)}), flush=True)
    for variant in args.variants.split(","):
        name, *kept = variant.split("+")
        if name in ("wround", "xround", "mixed", "mixed2", "mixed3"):
            model = _build(args.part)
            {"wround": _round_weights, "xround": _round_inputs}.get(name, lambda m, h: None)(model, torch.bfloat16)
            if name.startswith("mixed"):
                _half_matmuls(model, torch.bfloat16, split={"mixed": 1, "mixed2": 2, "mixed3": 3}[name])
            start = time.perf_counter()
            value = _run(args.part, model, args.size, torch.float32)
            seconds = time.perf_counter() - start
            print(
                json.dumps({"variant": variant, "seconds": round(seconds, 2), **_distance(value, reference)}),
                flush=True,
            )
            continue
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        model = _build(args.part)
        layout = torch.channels_last if use_channels_last(torch.device("cpu"), half) else torch.contiguous_format
        model = nn.Module.to(model, dtype=half, memory_format=layout)
        for kind in kept:
            _keep_in_fp32(_kinds(model, kind), half)
        start = time.perf_counter()
        value = _run(args.part, model, args.size, half)
        seconds = time.perf_counter() - start
        print(json.dumps({"variant": variant, "seconds": round(seconds, 2), **_distance(value, reference)}), flush=True)


if __name__ == "__main__":
    main()
