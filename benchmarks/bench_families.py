"""PiSA-SR's U-Net pass at full SD 2.1-base size: the cost of its modes and of the switched-off adapters.

Builds the U-Net from the bundled SD 2.1-base config with random weights, merges two random
rank-4 LoRA sets (pixel, then semantic) as the engine does, and times one U-Net pass on a latent
of ``--latent`` pixels (fastest of ``--repeats``, the cases taking turns):

* ``merged``: the merged U-Net alone (what PiSA-SR's default mode would cost without the
  sign-flipped semantic adapters that the adjustable mode switches on);
* ``default``: the engine's default mode, those adapters present and switched off
  (``unet_with_adapters_off``: the bare U-Net call of it, without the step function around it);
* ``adjustable``: λ_pix = 0.5, λ_sem = 1.4 (two calls, one with the adapters on).

Prints one JSON document with times, the ratios to ``merged`` and the extra memory the
adjustable mode holds: the engine's sign-flipped adapters, against the released script's kept
copy of the pixel weights plus full-size semantic deltas (counted as two U-Net-sized sets; not
built here, the machine would need three U-Nets in memory).

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


def _race(cases: dict, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs per case, the cases taking turns (a shared machine drifts less between them)."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side in pixels (64 = a 512 px image)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    from fidesr_core.loading.restorer import NEGATED_SUFFIX
    from fidesr_core.networks.lora import load_lora_state, negated_lora_state
    from fidesr_core.ops.restoration import predict_residual

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / "unet"))).eval()
    unet.requires_grad_(False)
    groups = lora_target_modules(unet)
    semantic_state: dict[str, torch.Tensor] = {}
    for kind in ("pix", "sem"):
        targets = {f"{name}_{kind}": modules for name, modules in groups.items()}
        add_lora_adapters(unet, targets, rank=4)
        state = {k: torch.randn_like(v) * 0.01 for k, v in lora_state_dict(unet).items()}
        load_lora_state(unet, state)
        if kind == "sem":
            semantic_state = state
        merge_lora(unet)
    renamed = {f"{name}_sem": f"{name}_sem{NEGATED_SUFFIX}" for name in groups}
    negated_targets = {renamed[f"{name}_sem"]: modules for name, modules in groups.items()}
    embedding = torch.randn(1, 77, 1024)
    z_lq = torch.randn(1, 4, args.latent, args.latent)
    timestep = torch.tensor(1)

    def merged() -> torch.Tensor:
        with torch.no_grad():
            return unet(z_lq, timestep, encoder_hidden_states=embedding).sample

    results = _race({"merged": merged}, args.repeats)
    released_bytes = 2 * sum(p.numel() * p.element_size() for p in unet.parameters())
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
    results |= _race(
        {
            "unet_with_adapters_off": merged,  # the same U-Net call without the step function around it
            "default": lambda: predict_residual(model, z_lq, tile_size=0),
            "adjustable": lambda: predict_residual(model, z_lq, tile_size=0, pixel_strength=0.5, semantic_strength=1.4),
        },
        args.repeats,
    )
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if "lora" in n)
    report = {
        "latent": args.latent,
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 3) for k, v in results.items()},
        "ratio_to_merged": {k: round(v / results["merged"], 3) for k, v in results.items()},
        "extra_memory_bytes": {"engine_adapters": adapter_bytes, "released_weight_copy_and_deltas": released_bytes},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
