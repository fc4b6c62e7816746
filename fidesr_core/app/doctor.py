"""``python -m fidesr_core doctor``: is the install sound, what can this machine do, what are these files?"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import TextIO

import torch

from ..errors import FiDeSRError
from ..precision import dtype_name, precision_reason, resolve_device

_PACKAGES = ("torch", "diffusers", "peft", "accelerate", "transformers", "safetensors", "numpy", "pillow", "tqdm")


def _report_versions(out: TextIO) -> bool:
    print(f"python       {platform.python_version()} on {platform.platform()}", file=out)
    healthy = True
    for package in _PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version, healthy = "MISSING (pip install -r requirements.txt)", False
        print(f"{package:<12} {version}", file=out)
    return healthy


def _report_devices(out: TextIO) -> None:
    print(f"cpu          {os.cpu_count()} threads; precision {precision_reason('auto', torch.device('cpu'))}", file=out)
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(
                f"cuda:{index}       {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}; auto precision: fp16",
                file=out,
            )
    else:
        print(f"cuda         not available (torch built with CUDA {torch.version.cuda or 'none'})", file=out)
    print(f"mps          {'available' if torch.backends.mps.is_available() else 'not available'}", file=out)


def _check_tiny_pipeline(out: TextIO) -> bool:
    """Run every stage on a tiny random model on the auto device (tiled and untiled)."""
    from ..loading.restorer import assemble_restorer
    from ..networks.tiny import tiny_base_model, tiny_fidesr_weights
    from ..pipeline import UpscaleSettings, upscale

    device = resolve_device("auto")
    try:
        start = time.perf_counter()
        base = tiny_base_model()
        model = assemble_restorer(base, tiny_fidesr_weights(base), precision="auto", device=device)
        # A small processing size keeps the check quick (the min-side rule would make this 512 px wide).
        image = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
        small = {"process_size": 64}
        plain = upscale(model, image, UpscaleSettings(latent_mode="mode", **small))
        tiled = upscale(
            model, image, UpscaleSettings(tile_size=6, tile_overlap=2, encode_tile_size=32, decode_tile_size=4, **small)
        )
        elapsed = time.perf_counter() - start
    except Exception as error:  # the point of doctor is to report anything at all
        print(f"pipeline     FAILED on {device}: {type(error).__name__}: {error}", file=out)
        return False
    healthy = plain.shape == (1, 3, 64, 96) and torch.isfinite(plain).all() and torch.isfinite(tiled).all()
    verdict = "ok" if healthy else f"WRONG output (shape {tuple(plain.shape)}, finite {torch.isfinite(plain).all()})"
    what = f"tiny random model on {device} ({dtype_name(model.dtype)}), untiled + tiled, {elapsed:.1f} s"
    print(f"pipeline     {verdict}: {what}", file=out)
    return bool(healthy)


def _check_base(path: Path, out: TextIO) -> bool:
    from ..loading.base_model import check_base_model

    try:
        identity = check_base_model(path)  # loads it when it looks usable
    except FiDeSRError as error:
        print(f"base         {path}: NOT usable: {error}", file=out)
        return False
    verdict = "loads; usable as the FiDeSR base" if identity.is_sd2 else "NOT usable: FiDeSR needs SD 2.1-base"
    print(f"base         {path}: {identity.family}, {identity.container}; {verdict}", file=out)
    print(f"             looks like {identity.description}", file=out)
    for note in identity.notes:
        print(f"             note: {note}", file=out)
    return identity.is_sd2


def _check_weights(path: Path, out: TextIO) -> bool:
    from ..loading.weights import describe_restorer_weights, load_restorer_weights

    try:
        description = describe_restorer_weights(load_restorer_weights(path))
    except FiDeSRError as error:
        print(f"weights      {error}", file=out)
        return False
    summary = ", ".join(f"{key} {value}" for key, value in description.items() if key != "metadata")
    print(f"weights      {path}: ok ({summary})", file=out)
    return True


def run_doctor(*, base: Path | None = None, weights: Path | None = None, out: TextIO) -> bool:
    """Print the report; True when everything checked is usable."""
    healthy = _report_versions(out)
    _report_devices(out)
    healthy = _check_tiny_pipeline(out) and healthy
    if base is not None:
        healthy = _check_base(base, out) and healthy
    if weights is not None:
        healthy = _check_weights(weights, out) and healthy
    print("all good" if healthy else "problems found (see above)", file=out)
    return healthy
