"""Per-stage time and peak memory of FiDeSR at full SD 2.1-base size, with random weights.

Builds the U-Net and VAE from the bundled SD 2.1-base configs (no weights
needed, runs anywhere), then times, for each case and precision:

* ``ours``: the engine's pipeline as shipped (``fidesr_core`` steps);
* ``reference``: a plain path in the style of the released code (stock
  diffusers calls, eager, NCHW, LoRA merged, the released tiling with the
  LRRB per tile, untiled VAE).

Every (path, case, precision) runs in its own subprocess so peak memory
(RSS on CPU, ``max_memory_allocated`` on CUDA) belongs to that run alone.
Prints one JSON document: stage times, totals, peaks, ours/reference
speed-up and how far bf16/fp16 outputs are from fp32.

    python benchmarks/bench_pipeline.py --cases small,large --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_probe import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

from fidesr_core.runtime import Runtime  # noqa: E402
from fidesr_core.settings import HighFrequencySettings, LowFrequencySettings  # noqa: E402

# LQ sizes: 128->512 untiled, 256x384->1024x1536 tiled, 1024->4096 (run it with --paths ours: the reference's
# untiled VAE would need tens of GB there)
CASES = {"small": (128, 128), "large": (256, 384), "huge": (1024, 1024)}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_networks(dtype: torch.dtype, device: torch.device, channels_last: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fidesr_core.networks.lrrb import LRRB

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder="vae"))
    lrrb = LRRB()
    for parameter in lrrb.parameters():  # an untrained LRRB is exactly zero; give it work to do
        torch.nn.init.normal_(parameter, std=0.02)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    unet = torch.nn.Module.to(unet.eval(), device=device, dtype=dtype, memory_format=memory_format)
    vae = torch.nn.Module.to(vae.eval(), device=device, dtype=dtype, memory_format=memory_format)
    embedding = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(1))
    return unet.requires_grad_(False), vae.requires_grad_(False), lrrb.to(device).requires_grad_(False), embedding


class StageTimer:
    """Seconds and peak memory of each stage: the peak RSS during the stage (CPU) or the peak allocated
    memory (CUDA), minus ``baseline`` (what was held before the run: weights, runtime)."""

    def __init__(self, device: torch.device, baseline: int = 0) -> None:
        self.device, self.seconds, self.peak_bytes, self.baseline = device, {}, {}, baseline

    def __call__(self, stage: str, fn, *args, **kwargs):
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        _sync(self.device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss_bytes()
        self.peak_bytes[stage] = max(self.peak_bytes.get(stage, 0), peak - self.baseline)
        return result


class HostMapsRuntime(Runtime):
    """The engine's Runtime, told that accelerators have no free memory: the tiled VAE's maps wait on the host."""

    def free_memory(self, device: torch.device) -> int | None:
        return super().free_memory(device) if device.type == "cpu" else 0


def _run_ours(networks, image, dtype, device, timer: StageTimer, host_maps: bool = False):
    """The engine's own stages, each timed under its name (``runtime.STAGES``), then the PNG encode;
    ``host_maps``: the tiled VAE's maps kept off the accelerator."""
    from fidesr_core.app.image_io import save_png_atomic
    from fidesr_core.networks.model import OneStepRestorer
    from fidesr_core.pipeline import decode_stage, encode_stage, injection_stage, refine_stage, residual_stage
    from fidesr_core.settings import UpscaleSettings

    unet, vae, lrrb, embedding = networks
    model = OneStepRestorer(unet=unet, vae=vae, lrrb=lrrb, prompt_embedding=embedding.to(device), dtype=dtype)
    settings, runtime = UpscaleSettings(latent_mode="mode"), HostMapsRuntime() if host_maps else Runtime()
    with torch.no_grad():
        latents = timer("encode", encode_stage, model, image.to(device), settings, runtime)
        latents = timer("residual", residual_stage, model, latents, settings, runtime)
        latents = timer("refine", refine_stage, model, latents, runtime)
        latents = timer("lf", injection_stage, latents, settings.lf, runtime)
        latents = timer("hf", injection_stage, latents, settings.hf, runtime)
        result = timer("decode", decode_stage, model, latents, settings, runtime)
        del latents
        with tempfile.TemporaryDirectory() as folder:
            timer("png", save_png_atomic, Path(folder) / "out.png", result[0])
        return result


def _released_tiles(length: int, tile: int, overlap: int) -> list[int]:
    count, covered = 0, 0
    while covered < length:
        covered = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [length - tile if i == count - 1 else i * (tile - overlap) for i in range(count)]


def _run_reference(networks: tuple, image: torch.Tensor, dtype: torch.dtype, device: torch.device, timer: StageTimer):
    """The released computation, written plainly: stock diffusers calls, LRRB per tile."""
    import torch.nn.functional as F

    from fidesr_core.ops.color_fix import adain_color_fix
    from fidesr_core.ops.injection import inject_frequencies, spatial_gate
    from fidesr_core.ops.latent_tiling import gaussian_tile_weight

    unet, vae, lrrb, embedding = networks
    scale = 0.18215
    with torch.no_grad():

        def encode() -> tuple[torch.Tensor, torch.Tensor]:
            upscaled = F.interpolate(image, scale_factor=4, mode="bicubic", antialias=True).clamp(0, 1)
            upscaled = upscaled[..., : upscaled.shape[-2] // 8 * 8, : upscaled.shape[-1] // 8 * 8].to(device)
            return upscaled, vae.encode((upscaled * 2 - 1).to(dtype)).latent_dist.mode().float() * scale

        upscaled, z_lq = timer("encode", encode)
        pixels = upscaled * 2 - 1
        emb = embedding.to(device, dtype)

        def unet_and_lrrb(tile: torch.Tensor) -> torch.Tensor:
            r = timer("residual", lambda: unet(tile.to(dtype), 1, encoder_hidden_states=emb).sample.float())
            return timer("refine", lambda: r + lrrb(torch.cat([tile, r], 1)))

        h, w = z_lq.shape[-2:]
        if h * w <= 96 * 96:
            refined = unet_and_lrrb(z_lq)
        else:
            tile = min(96, h, w)
            weight = gaussian_tile_weight(tile, tile).to(device)
            refined = torch.zeros_like(z_lq)
            weights = torch.zeros_like(z_lq)
            for top in _released_tiles(h, tile, 32):
                for left in _released_tiles(w, tile, 32):
                    out = unet_and_lrrb(z_lq[..., top : top + tile, left : left + tile])
                    refined[..., top : top + tile, left : left + tile] += out * weight
                    weights[..., top : top + tile, left : left + tile] += weight
            refined = refined / weights

        def inject():
            gate = spatial_gate(pixels, (h, w))
            low, high = LowFrequencySettings(), HighFrequencySettings()
            return inject_frequencies(z_lq - refined, z_lq, gate, low, high)

        latent = timer("lf+hf", inject)

        def decode() -> torch.Tensor:
            decoded = vae.decode((latent / scale).to(dtype)).sample.float()
            return adain_color_fix((decoded.clamp(-1, 1) + 1) / 2, upscaled)

        return timer("decode", decode)


def _worker(
    path: str, case: str, precision: str, device_name: str, output: Path, repeats: int, host_maps: bool
) -> dict:
    from fidesr_core.loading.restorer import use_channels_last
    from fidesr_core.precision import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    dtype = resolve_dtype(precision, device)
    height, width = CASES[case]
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    run = functools.partial(_run_ours, host_maps=host_maps) if path == "ours" else _run_reference
    networks = _build_networks(dtype, device, channels_last=path == "ours" and use_channels_last(device, dtype))
    weights_bytes = sum(p.numel() * p.element_size() for net in networks[:3] for p in net.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak_is_pipeline_only = device.type == "cuda" or reset_peak_rss()
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    # The fastest run per stage is kept, which filters out other work on a shared machine.
    # A warm-up run (kernel selection, allocator) is only worth its time on accelerators.
    if device.type != "cpu":
        run(networks, image, dtype, device, StageTimer(device, baseline))
    timings, stage_peaks = [], {}
    start = time.perf_counter()
    for _ in range(repeats):
        timer = StageTimer(device, baseline)
        result = run(networks, image, dtype, device, timer)
        timings.append(timer.seconds)
        stage_peaks = {k: max(v, stage_peaks.get(k, 0)) for k, v in timer.peak_bytes.items()}
    total = time.perf_counter() - start
    best = {stage: min(t[stage] for t in timings) for stage in timings[0]}
    torch.save(result.cpu(), output)
    peak = max(stage_peaks.values()) + baseline
    return {
        "path": path,
        "case": case,
        "lq_size": [height, width],
        "output_size": list(result.shape[-2:]),
        "precision": precision,
        "device": str(device),
        "repeats": repeats,
        "vae_maps": "host (accelerators told they have no free memory)" if host_maps else "placed by free memory",
        "stage_seconds": {k: round(v, 4) for k, v in best.items()},
        "pipeline_seconds": round(sum(best.values()), 4),
        "wall_seconds_all_repeats": round(total, 2),
        "peak_memory_mib": round(peak / 2**20, 1),
        "peak_beyond_weights_mib": round((peak - baseline) / 2**20, 1),
        "stage_peak_beyond_weights_mib": {k: round(v / 2**20, 1) for k, v in stage_peaks.items()},
        "weights_mib": round(weights_bytes / 2**20, 1),
        "peak_memory_kind": ("cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS")
        + (" during the runs (weights included)" if peak_is_pipeline_only else " (model build included)"),
    }


def _spawn(path: str, case: str, precision: str, device: str, folder: Path, repeats: int, host_maps: bool) -> dict:
    output = folder / f"{path}-{case}-{precision}.pt"
    command = [
        sys.executable,
        __file__,
        "--worker",
        path,
        case,
        precision,
        "--device",
        device,
        "--save",
        str(output),
        "--repeats",
        str(repeats),
        *(["--host-maps"] if host_maps else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"path": path, "case": case, "precision": precision, "error": done.stderr.strip().splitlines()[-3:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="small,large")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--paths", default="reference,ours")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; the fastest stage times count")
    parser.add_argument("--host-maps", action="store_true", help="keep the tiled VAE's maps off the accelerator")
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "CASE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.device, args.save, args.repeats, args.host_maps)))
        return
    runs, comparisons = [], []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for case in args.cases.split(","):
            for precision in args.precisions.split(","):
                for path in args.paths.split(","):
                    runs.append(_spawn(path, case, precision, args.device, folder, args.repeats, args.host_maps))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        comparisons = _compare(runs, folder)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "runs": runs,
                "comparisons": comparisons,
            },
            indent=2,
        )
    )


def _compare(runs: list[dict], folder: Path) -> list[dict]:
    """Speed-up of ours over reference, and output distances, per case."""
    found = {(r["path"], r["case"], r["precision"]): r for r in runs if "error" not in r}
    comparisons = []
    for (path, case, precision), run in found.items():
        if path != "ours":
            continue
        entry: dict = {"case": case, "precision": precision}
        ours = torch.load(folder / f"ours-{case}-{precision}.pt")
        for ref_precision in ("fp32", precision):
            reference = found.get(("reference", case, ref_precision))
            if reference:
                entry[f"speedup_vs_reference_{ref_precision}"] = round(
                    reference["pipeline_seconds"] / run["pipeline_seconds"], 3
                )
                other = torch.load(folder / f"reference-{case}-{ref_precision}.pt")
                if other.shape == ours.shape:
                    entry[f"max_abs_diff_vs_reference_{ref_precision}"] = float((other - ours).abs().max())
        if ("ours", case, "fp32") in found and precision != "fp32":
            base = torch.load(folder / f"ours-{case}-fp32.pt")
            entry["vs_ours_fp32_max_abs"] = float((base - ours).abs().max())
            entry["vs_ours_fp32_mean_abs"] = float((base - ours).abs().mean())
            entry["vs_ours_fp32_psnr_db"] = float(10 * torch.log10(1 / ((base - ours) ** 2).mean()))
        comparisons.append(entry)
    return comparisons


if __name__ == "__main__":
    main()
