"""Time, peak host memory and temporary-file traffic of the tiled VAE alone (full-size SD 2.1-base VAE, random
weights) at several sizes.

Each (coder, size, precision) runs in its own process; the peak is the process's peak RSS
during the call minus its RSS just before it (the weights, the input and the runtime are
already there), so it is what the encode or decode itself adds.  ``maps_*`` are the most the
whole-image maps held at once in each place and ``file_*`` the bytes they moved through
temporary files (counted by the map store); ``wchar`` is what the process wrote (``/proc/self/io``).

    python benchmarks/bench_vae_memory.py --coder decode --sizes 1024,2048,4096 --precisions bf16
    python benchmarks/bench_vae_memory.py --coder encode --sizes 2048 --precisions fp32 --vae-memory 512 --tile-mb 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_probe import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _wchar() -> int:
    try:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["wchar"])
    except (OSError, KeyError, ValueError):
        return 0


def _worker(coder: str, size: int, precision: str, tile: int | None, budget_options: dict) -> dict:
    from diffusers import AutoencoderKL

    from fidesr_core.loading.restorer import use_channels_last
    from fidesr_core.tiled_vae import codec
    from fidesr_core.tiled_vae.budget import MemoryBudget
    from fidesr_core.tiled_vae.codec import decode_latents, encode_moments

    stores = []

    class CountedStore(codec.MapStore):  # keeps the run's store to read its peaks and traffic afterwards
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            stores.append(self)

    codec.MapStore = CountedStore
    budget = MemoryBudget(**budget_options)
    options = {"budget": budget} | ({} if tile is None else {"tile_size": tile})

    dtype, device = _DTYPES[precision], torch.device("cpu")
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae")).eval()
    memory_format = torch.channels_last if use_channels_last(device, dtype) else torch.contiguous_format
    vae = torch.nn.Module.to(vae, dtype=dtype, memory_format=memory_format).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if coder == "decode":
            source = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(dtype)
            run = lambda: decode_latents(vae, source, **options)  # noqa: E731
        else:
            source = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(dtype)
            run = lambda: encode_moments(vae, source, **options)  # noqa: E731
        before, wchar = rss_bytes(), _wchar()
        reset_peak_rss()
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        peak, wchar = peak_rss_bytes(), _wchar() - wchar
    gib = 2**30
    store = stores[-1] if stores else None
    return {
        "coder": coder,
        "size": size,
        "precision": precision,
        "seconds": round(seconds, 2),
        "peak_growth_mib": round((peak - before) / 2**20, 1),
        "output_mib": round(result.numel() * result.element_size() / 2**20, 1),
        "tile_mib": None if store is None else store.tile_bytes >> 20,
        "rooms_gib": None if store is None else {k: round(v / gib, 2) for k, v in store.rooms.items() if k != "file"},
        "maps_peak_gib": None if store is None else {k: round(v / gib, 2) for k, v in store.peak.items()},
        "file_written_gib": 0 if store is None else round(store.traffic["written"] / gib, 2),
        "file_read_gib": 0 if store is None else round(store.traffic["read"] / gib, 2),
        "wchar_gib": round(wchar / gib, 2),
        "finite": bool(torch.isfinite(result).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coder", default="decode", choices=("decode", "encode"))
    parser.add_argument("--sizes", default="1024,2048", help="image sizes in pixels (square)")
    parser.add_argument("--precisions", default="bf16")
    parser.add_argument("--tile", type=int, default=None, help="tile_size (default: the codec's)")
    parser.add_argument("--vae-memory", type=int, default=None, help="cap on maps in RAM, MiB (default: automatic)")
    parser.add_argument("--tile-mb", type=int, default=None, help="a tile's largest activation, MiB (default: auto)")
    parser.add_argument("--places", default=None, help="where maps may wait, in order (default: device,host,file)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        coder, size, precision = args.worker
        budget = {"map_bytes": None if args.vae_memory is None else args.vae_memory << 20}
        budget |= {"tile_bytes": None if args.tile_mb is None else args.tile_mb << 20}
        budget |= {} if args.places is None else {"places": tuple(args.places.split(","))}
        print(json.dumps(_worker(coder, int(size), precision, args.tile, budget)))
        return
    for precision in args.precisions.split(","):
        for size in args.sizes.split(","):
            command = [sys.executable, __file__, "--worker", args.coder, size, precision]
            for flag in ("tile", "vae_memory", "tile_mb", "places"):
                if getattr(args, flag) is not None:
                    command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = done.stdout.strip().splitlines()
            ok = done.returncode == 0 and lines
            print(lines[-1] if ok else json.dumps({"size": size, "error": done.stderr[-600:]}), flush=True)


if __name__ == "__main__":
    main()
