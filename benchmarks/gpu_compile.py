"""The fixed 128->512 path on a GPU (VAE encode 512², U-Net on the 64² latent, VAE decode): milliseconds
eager, replayed as one CUDA graph, and under torch.compile; prints which wins.

Random full-size SD 2.1-base networks in fp16 (or --precision bf16), channels_last. Each variant is
timed as the median of --repeats runs after a warm-up; a variant that fails is reported and skipped.

    python benchmarks/gpu_compile.py --precision fp16 --variants eager,cudagraph,compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base"


def _networks(dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae"))
    move = dict(device="cuda", dtype=dtype, memory_format=torch.channels_last)
    return nn.Module.to(unet.eval(), **move), nn.Module.to(vae.eval(), **move)


def _path(unet, vae, embedding):
    def run(pixels: torch.Tensor) -> torch.Tensor:
        latent = vae.encode(pixels).latent_dist.mode() * 0.18215
        residual = unet(latent, 1, encoder_hidden_states=embedding).sample
        return vae.decode((latent - residual) / 0.18215).sample

    return run


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--variants", default="eager,cudagraph,compile")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    torch.backends.cudnn.benchmark = True
    unet, vae = _networks(dtype)
    embedding = torch.randn(1, 77, 1024, device="cuda", dtype=dtype)
    pixels = torch.rand(1, 3, 512, 512, device="cuda", dtype=dtype).mul_(2).sub_(1)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    results: dict = {"precision": args.precision, "device": torch.cuda.get_device_name(0)}
    with torch.no_grad():
        for variant in args.variants.split(","):
            start = time.perf_counter()
            try:
                if variant == "eager":
                    run = _path(unet, vae, embedding)
                    run(pixels)
                    timed = lambda run=run: run(pixels)  # noqa: E731
                elif variant == "cudagraph":
                    run, static_input = _path(unet, vae, embedding), pixels.clone()
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for _ in range(3):
                            run(static_input)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        run(static_input)
                    timed = graph.replay
                elif variant == "compile":
                    run = _path(torch.compile(unet), torch.compile(vae), embedding)
                    run(pixels)
                    timed = lambda run=run: run(pixels)  # noqa: E731
                else:
                    raise ValueError(f"unknown variant {variant}")
                setup = time.perf_counter() - start
                results[variant] = {"ms": round(_median_ms(timed, args.repeats), 2), "setup_s": round(setup, 1)}
            except Exception as error:  # one variant failing must not lose the others
                results[variant] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(json.dumps({variant: results[variant]}), flush=True)
    timed_ok = {k: v["ms"] for k, v in results.items() if isinstance(v, dict) and "ms" in v}
    if timed_ok:
        results["winner"] = min(timed_ok, key=timed_ok.get)
    results["peak_vram_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
