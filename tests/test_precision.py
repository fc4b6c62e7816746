"""``auto`` precision follows what the CPU runs natively, and says why."""

from __future__ import annotations

import pytest
import torch

from fidesr_core import precision
from fidesr_core.errors import SettingsError

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("features", "native_bf16", "expected", "named"),
    [
        ({"amx_fp16", "amx_tile"}, True, torch.float16, "AMX-FP16"),
        ({"amx_tile"}, True, torch.bfloat16, "AMX-BF16"),
        (set(), True, torch.bfloat16, "AVX512-BF16"),
        (set(), False, torch.float32, "no native"),
    ],
)
def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, features, native_bf16, expected, named) -> None:
    monkeypatch.setattr(precision, "_cpu_has", lambda feature: feature in features)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    dtype, reason = precision.auto_dtype(CPU)
    assert dtype == expected and named in reason
    assert precision.resolve_dtype("auto", CPU) == expected
    assert precision.precision_reason("auto", CPU).startswith(f"{precision.dtype_name(expected)} (auto: ")
    assert precision.precision_reason("fp32", CPU) == "fp32 (asked for)"


def test_accelerators_pick_fp16_and_a_bad_name_is_refused() -> None:
    assert precision.auto_dtype(torch.device("cuda"))[0] == torch.float16
    with pytest.raises(SettingsError, match="precision must be one of"):
        precision.resolve_dtype("fp8", CPU)
