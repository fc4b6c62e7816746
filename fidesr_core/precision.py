"""Choice of device and compute precision."""

from __future__ import annotations

from typing import Literal

import torch

from .errors import SettingsError

__all__ = [
    "Precision",
    "PRECISIONS",
    "cpu_has_native_bf16",
    "resolve_device",
    "resolve_dtype",
    "dtype_name",
]

Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX).

    Without it bf16 convolutions are emulated and slower than fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``"auto"``/``None`` picks CUDA, then MPS, then CPU; otherwise checks the named device exists."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SettingsError(f"device {name!r} is not a torch device (use auto, cpu, cuda, cuda:N or mps)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device {name!r} was asked for but this torch build sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"device {name!r} was asked for but MPS is not available here")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype for U-Net and VAE.

    ``auto``: fp16 on CUDA and MPS; on CPU bf16 where it runs natively (the
    benchmark in ``benchmarks/`` measured it faster than fp32 with no visible
    change), else fp32.
    """
    if precision == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if precision not in _DTYPES:
        raise SettingsError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return _DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    return str(dtype)
