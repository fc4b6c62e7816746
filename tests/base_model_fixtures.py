"""Test helper: the network guard shared by the base-model tests (test_base_model.py, test_base_model_refusals.py).

The guard cuts sockets and every Hub download entry point, without relying on
HF_HUB_OFFLINE, and records each attempt so the test fails even when the code
under test swallows the error.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator

import pytest

__all__ = ["HUB_FUNCTIONS", "guard_network"]

HUB_FUNCTIONS = ("hf_hub_download", "snapshot_download", "model_info", "hf_hub_url", "get_hf_file_metadata")


def guard_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Cut sockets and every Hub download entry point; yield the attempts, then fail if anything tried them.

    Meant to be driven by a yield fixture: ``yield from guard_network(monkeypatch)``.
    """
    attempts: list[str] = []

    def refuse(name: str) -> Callable[..., None]:
        def blocked(*args, **kwargs):
            attempts.append(name)
            raise AssertionError(f"network access attempted: {name}")

        return blocked

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("huggingface_hub", "diffusers", "transformers")):
            continue
        for function in HUB_FUNCTIONS:
            if callable(getattr(module, function, None)):
                monkeypatch.setattr(module, function, refuse(f"{module_name}.{function}"))
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"
