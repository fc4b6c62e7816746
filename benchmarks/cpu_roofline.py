"""How close the networks come to this CPU's own matrix rate: GFLOP/s of one large convolution and one
large matmul, against the GFLOP/s the full-size U-Net (one 64² latent) and VAE decoder (one 256² image)
reach, counting only their convolutions and linear layers.

    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_roofline.py --precision fp32   # as on an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _counted_flops(model: nn.Module, run) -> int:
    """Multiply-adds ×2 of every Conv2d and Linear in one call of ``run``."""
    total = [0]

    def count(module, args, output):
        if isinstance(module, nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += 2 * output.numel() * kernel
        else:
            total[0] += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    run()
    for handle in handles:
        handle.remove()
    return total[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=tuple(_DTYPES))
    args = parser.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = _DTYPES[args.precision]
    layout = torch.channels_last if dtype != torch.float32 else torch.contiguous_format
    result: dict = {"precision": args.precision, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    with torch.no_grad():
        conv = nn.Conv2d(512, 512, 3, padding=1).to(dtype=dtype, memory_format=layout)
        x = torch.randn(1, 512, 64, 64).to(dtype=dtype, memory_format=layout)
        flops = 2 * 512 * 512 * 9 * 64 * 64
        result["conv_gflops"] = round(flops / _best_seconds(lambda: conv(x)) / 1e9, 1)
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        result["matmul_gflops"] = round(2 * 4096**3 / _best_seconds(lambda: a @ b) / 1e9, 1)

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet"))
        unet = nn.Module.to(unet.eval(), dtype=dtype, memory_format=layout)
        latent, embedding = torch.randn(1, 4, 64, 64).to(dtype), torch.randn(1, 77, 1024).to(dtype)
        flops = _counted_flops(unet, lambda: unet(latent, 1, encoder_hidden_states=embedding))
        seconds = _best_seconds(lambda: unet(latent, 1, encoder_hidden_states=embedding), 1)
        result["unet_gflops"] = round(flops / seconds / 1e9, 1)

        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae"))
        vae = nn.Module.to(vae.eval(), dtype=dtype, memory_format=layout)
        latents = torch.randn(1, 4, 32, 32).to(dtype)
        run_decoder = lambda: vae.decode(latents)  # noqa: E731
        flops = _counted_flops(vae, run_decoder)
        result["decoder_gflops"] = round(flops / _best_seconds(run_decoder, 1) / 1e9, 1)
    peak = max(result["conv_gflops"], result["matmul_gflops"])
    result["unet_fraction_of_peak"] = round(result["unet_gflops"] / peak, 2)
    result["decoder_fraction_of_peak"] = round(result["decoder_gflops"] / peak, 2)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
