"""The engine's ``Runtime`` for ComfyUI: its memory manager, progress bars, Cancel and out-of-memory error.

A stage loads its networks with ``load_models_gpu`` plus one image's working memory; as many images run at once
as free memory holds; results wait on ComfyUI's intermediate device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management as model_management
import comfy.utils
import torch

from ..fidesr_core.progress import CancelCheck, StageProgress
from ..fidesr_core.runtime import Runtime
from .model_handle import FiDeSRModelHandle


def interrupt_check() -> bool:
    """Engine ``should_cancel``: raises ComfyUI's interrupt itself, so it never needs to return True."""
    model_management.throw_exception_if_processing_interrupted()
    return False


@dataclass
class _StageBars:
    """One ComfyUI progress bar per stage."""

    bars: dict[str, comfy.utils.ProgressBar] = field(default_factory=dict)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.bars:
            self.bars[stage] = comfy.utils.ProgressBar(total)
        self.bars[stage].update_absolute(done, total)


@dataclass
class ComfyRuntime(Runtime):
    """Runs the engine's stages for a node through ComfyUI's memory manager (``handle``: the model, or None
    for the injections, which run no network)."""

    progress: StageProgress | None = field(default_factory=_StageBars)
    should_cancel: CancelCheck | None = interrupt_check
    advice: str = (
        "free memory (Unload Models in ComfyUI's menu, close other programs), start ComfyUI with --lowvram, "
        "use a lower precision in Load FiDeSR Model, or give a smaller input image"
    )
    handle: FiDeSRModelHandle | None = None

    def device(self, networks, weights_device: torch.device, working_bytes: int) -> torch.device:
        if not networks:  # the injections: a few latent-sized maps, no weights
            return model_management.get_torch_device()
        patchers = [self.handle.patchers[name] for name in networks]
        whole = not all(self.handle.partial_load[name] for name in networks)
        model_management.load_models_gpu(patchers, memory_required=working_bytes, force_full_load=whole)
        return patchers[0].load_device

    def images_at_once(self, device: torch.device, working_bytes: int, batch: int) -> int:
        return int(model_management.get_free_memory(device) // working_bytes)

    def rest(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(model_management.intermediate_device())

    def free_memory(self, device: torch.device) -> int:
        return int(model_management.get_free_memory(device))

    def is_out_of_memory(self, error: BaseException) -> bool:
        oom = model_management.OOM_EXCEPTION
        # ComfyUI falls back to Exception as OOM_EXCEPTION without CUDA support
        return (oom is not Exception and isinstance(error, oom)) or super().is_out_of_memory(error)

    def after_out_of_memory(self) -> None:
        model_management.soft_empty_cache()
