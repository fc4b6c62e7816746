"""PiSA-SR's U-Net pass at full SD 2.1-base size: the cost of its modes and of the switched-off adapters.

Builds the U-Net from the bundled SD 2.1-base config with random weights, merges two random
rank-4 LoRA sets (pixel, then semantic) as the engine does, and times one U-Net pass on a latent
of ``--latent`` pixels (fastest of ``--repeats``):

* ``merged``: the merged U-Net alone (what PiSA-SR's default mode would cost without the
  sign-flipped semantic adapters that the adjustable mode switches on);
* ``default``: the engine's default mode, those adapters present and switched off;
* ``adjustable``: λ_pix = 0.5, λ_sem = 1.4 (two calls, one with the adapters on);
* ``released_adjustable``: the released script's way, swapping between a kept copy of the pixel
  weights and pixel weights plus full-size semantic deltas between the calls.

Prints one JSON document with times, the ratios to ``merged`` and the extra memory each way holds.

    python benchmarks/bench_families.py --latent 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fidesr_core.networks.families import PISA_SR_RECIPE  # noqa: E402
from fidesr_core.networks.lora import (  # noqa: E402
    add_lora_adapters,
    lora_state_dict,
    lora_target_modules,
    merge_lora,
)
from fidesr_core.networks.model import OneStepRestorer  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[1] / "fidesr_core" / "loading" / "configs" / "sd21_base"


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side in pixels (64 = a 512 px image)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    from fidesr_core.loading.restorer import NEGATED_SUFFIX
    from fidesr_core.networks.lora import load_lora_state, negated_lora_state
    from fidesr_core.steps.restoration import predict_residual

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / "unet"))).eval()
    unet.requires_grad_(False)
    groups = lora_target_modules(unet)
    semantic_state: dict[str, torch.Tensor] = {}
    pixel_weights: dict[str, torch.Tensor] = {}
    for kind in ("pix", "sem"):
        targets = {f"{name}_{kind}": modules for name, modules in groups.items()}
        add_lora_adapters(unet, targets, rank=4)
        state = {k: torch.randn_like(v) * 0.01 for k, v in lora_state_dict(unet).items()}
        load_lora_state(unet, state)
        if kind == "sem":
            semantic_state = state
        merge_lora(unet)
        if kind == "pix":  # the released script's kept copy of the pixel-merged weights
            pixel_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    renamed = {f"{name}_sem": f"{name}_sem{NEGATED_SUFFIX}" for name in groups}
    negated_targets = {renamed[f"{name}_sem"]: modules for name, modules in groups.items()}
    embedding = torch.randn(1, 77, 1024)
    z_lq = torch.randn(1, 4, args.latent, args.latent)
    timestep = torch.tensor(1)

    def merged() -> torch.Tensor:
        with torch.no_grad():
            return unet(z_lq, timestep, encoder_hidden_states=embedding).sample

    results = {"merged": _timed(merged, args.repeats)}
    add_lora_adapters(unet, negated_targets, rank=4)
    load_lora_state(unet, negated_lora_state(semantic_state, renamed))
    unet.disable_adapters()
    model = OneStepRestorer(
        unet=unet,
        vae=torch.nn.Identity(),
        lrrb=None,
        prompt_embedding=embedding,
        dtype=torch.float32,
        recipe=PISA_SR_RECIPE,
        pixel_only_adapters=tuple(negated_targets),
    )
    results["default"] = _timed(lambda: predict_residual(model, z_lq, tile_size=0), args.repeats)
    results["adjustable"] = _timed(
        lambda: predict_residual(model, z_lq, tile_size=0, pixel_strength=0.5, semantic_strength=1.4), args.repeats
    )

    # The released script keeps the pixel weights and full-size semantic deltas, and swaps between them.
    parameters = dict(unet.named_parameters())
    deltas = {
        name: parameters[name].data - pixel_weights[name]
        for name in pixel_weights
        if name in parameters and not torch.equal(parameters[name].data, pixel_weights[name])
    }

    def released_adjustable() -> torch.Tensor:
        with torch.no_grad():
            both = merged()
            for name, parameter in parameters.items():
                if name in pixel_weights:
                    parameter.data = pixel_weights[name]
            pixel = merged()
            for name, parameter in parameters.items():  # its _apply_lora_delta: delta + kept weights
                if name in deltas:
                    parameter.data = deltas[name] + pixel_weights[name]
            return 0.5 * pixel + 1.4 * (both - pixel)

    results["released_adjustable"] = _timed(released_adjustable, args.repeats)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if "lora" in n)
    released_bytes = sum(t.numel() * t.element_size() for t in (*pixel_weights.values(), *deltas.values()))
    report = {
        "latent": args.latent,
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 3) for k, v in results.items()},
        "ratio_to_merged": {k: round(v / results["merged"], 3) for k, v in results.items()},
        "extra_memory_bytes": {"engine_adapters": adapter_bytes, "released_weights_and_deltas": released_bytes},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
