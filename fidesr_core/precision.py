"""Choice of device and compute precision."""

from __future__ import annotations

import torch

from .errors import SettingsError

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); else it is emulated, slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_has(feature: str) -> bool:
    """A ``torch.cpu._is_<feature>_supported()`` probe; False where this torch lacks it."""
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """What ``auto`` picks on ``device``, and why in a few words.  On a CPU, what it runs natively (the numbers:
    benchmarks/README.md): fp16 with AMX-FP16 (as fast as bf16, 3 more mantissa bits), bf16 with AMX-BF16 or
    AVX512-BF16, else fp32 (emulated half types are slower, fp16 too with only AVX512-FP16 conversions)."""
    if device.type == "cuda":
        return torch.float16, "CUDA: fp16 tensor cores"
    if device.type == "mps":
        return torch.float16, "MPS: fp16 native"
    if _cpu_has("amx_fp16"):
        return torch.float16, "this CPU has AMX-FP16: fp16 runs natively, as fast as bf16 and finer"
    if cpu_has_native_bf16():
        units = "AMX-BF16" if _cpu_has("amx_tile") else "AVX512-BF16"
        return torch.bfloat16, f"this CPU has {units}: bf16 runs natively, several times faster than fp32"
    return torch.float32, "this CPU has no native bf16/fp16 units: half types would be emulated, slower than fp32"


def precision_why(precision: str, device: torch.device) -> str:
    """``"auto: this CPU has AMX-BF16 ..."`` or ``"asked for"``."""
    return f"auto: {auto_dtype(device)[1]}" if precision == "auto" else "asked for"


def precision_reason(precision: str, device: torch.device) -> str:
    """``"bf16 (auto: this CPU has AMX-BF16 ...)"`` or ``"fp32 (asked for)"``: the line a user reads."""
    return f"{dtype_name(resolve_dtype(precision, device))} ({precision_why(precision, device)})"


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
    """Compute dtype for U-Net and VAE; ``auto`` as ``auto_dtype`` says."""
    if precision == "auto":
        return auto_dtype(device)[0]
    if precision not in _DTYPES:
        raise SettingsError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return _DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    return str(dtype)
