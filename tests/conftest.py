"""Fixtures shared by the test files.

For every test: ``tiny`` (a tiny random SD 2-shaped base model), ``tiny_model`` (a tiny FiDeSR
model assembled from one), ``no_network`` (sockets and Hub downloads cut off and recorded),
``one_thread`` / ``one_thread_per_module`` (torch on one CPU thread: exactness tests fix the
thread count, and tiny tensors run far faster on one thread than on contended ones).
Built once per session; tests read them and never change them (assembly consumes a base: tests
that assemble build their own).

For the node tests (``test_nodes*.py``): the ComfyUI stand-in with the pack imported as ComfyUI
imports it, a tiny random FiDeSR model in the pack's own classes, LQ images and one run of the
whole node chain.  Those are module-scoped and undone when the file is done, so other test files
never see fake ComfyUI modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from base_model_fixtures import guard_network
from comfy_stub import import_pack, install_comfy_stubs, node_classes, remove_from_sys_modules
from node_helpers import PACK_ROOT, chain

from fidesr_core.loading.restorer import assemble_restorer
from fidesr_core.networks.model import BaseModel, OneStepRestorer
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights


@pytest.fixture(scope="session")
def tiny() -> BaseModel:
    """A tiny random SD 2-shaped base model (seed 3), for writing model files; never assembled."""
    return tiny_base_model(seed=3)


@pytest.fixture(scope="session")
def tiny_model() -> OneStepRestorer:
    """A tiny FiDeSR model, fp32 on the CPU (base seed 1, weights seed 2)."""
    base = tiny_base_model(seed=1)
    return assemble_restorer(base, tiny_fidesr_weights(base, seed=2), precision="fp32", device="cpu")


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    with _torch_threads(1):
        yield


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The network cut off for one test; yields the attempts (see base_model_fixtures.guard_network)."""
    yield from guard_network(monkeypatch)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """Stub ComfyUI modules plus the pack imported the way ComfyUI imports it."""
    models_dir = tmp_path_factory.mktemp("models")
    stub = install_comfy_stubs(models_dir)
    threads = torch.get_num_threads()
    # The tiny networks are too small to gain from threads, and on a busy CI machine threads that
    # wait for each other make them several times slower.
    torch.set_num_threads(1)
    try:
        pack = import_pack(PACK_ROOT)

        def module(relative: str) -> ModuleType:
            return importlib.import_module(f"{pack.__name__}.{relative}")

        yield SimpleNamespace(stub=stub, pack=pack, nodes=node_classes(pack), module=module, models_dir=models_dir)
    finally:
        torch.set_num_threads(threads)
        remove_from_sys_modules(PACK_ROOT)


@pytest.fixture(autouse=True)
def _fresh_records(request: pytest.FixtureRequest) -> None:
    """Each node test starts with an empty record of what the nodes asked the stand-in for (others: no-op)."""
    if "comfy" in request.fixturenames:
        request.getfixturevalue("comfy").stub.reset_records()


@pytest.fixture(scope="module")
def handle(comfy):
    """A FIDESR_MODEL around a tiny random FiDeSR model (fp32, CPU)."""
    tiny = comfy.module("fidesr_core.networks.tiny")
    loading = comfy.module("fidesr_core.loading.restorer")
    base = tiny.tiny_base_model(seed=1)
    weights = tiny.tiny_fidesr_weights(base, seed=2)
    model = loading.assemble_restorer(base, weights, precision="fp32", device="cpu")
    model_handle = comfy.module("nodes.model_handle")
    return model_handle.FiDeSRModelHandle.wrap(model, base_name="tiny", weights_name="tiny")


@pytest.fixture(scope="module")
def lq_images() -> torch.Tensor:
    """ComfyUI IMAGE [2, 32, 32, 3]; pre-scaled to 128 px (the min-side rule), so latents are 64 x 64.

    The tiny U-Net's attention makes whole 64 x 64 latents the slow part: most tests use one image.
    """
    generator = torch.Generator().manual_seed(7)
    return torch.rand((2, 32, 32, 3), generator=generator)


@pytest.fixture(scope="module")
def lq_image(lq_images: torch.Tensor) -> torch.Tensor:
    return lq_images[:1]


@pytest.fixture(scope="module")
def default_chain(comfy, handle, lq_image) -> dict[str, Any]:
    return chain(comfy, handle, lq_image)
