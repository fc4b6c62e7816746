"""The engine's ``Runtime`` for ComfyUI: its memory manager, progress bars, Cancel and out-of-memory error.

* A stage's networks (and only those) are loaded with ``model_management.load_models_gpu``,
  asking for one image's working memory on top, so ComfyUI evicts or partly unloads other models
  as needed and keeps ours resident afterwards;
* as many images of a batch run at once as the free memory holds (as ComfyUI's VAE does), and
  results wait on ``model_management.intermediate_device()`` between chunks and nodes;
* out of memory is ComfyUI's ``OOM_EXCEPTION``; the engine then retries with fewer images and
  smaller tiles and finally raises an error that the node shows;
* each stage reports to its own ``comfy.utils.ProgressBar``; Cancel is checked between tiles
  (``throw_exception_if_processing_interrupted`` raises ComfyUI's own exception, so an interrupt
  is shown as one, not as an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management as model_management
import comfy.utils
import torch

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

    handle: FiDeSRModelHandle | None = None

    def __post_init__(self) -> None:
        self.progress = self.progress or _StageBars()
        self.should_cancel = self.should_cancel or interrupt_check
        self.advice = (
            "free memory (Unload Models in ComfyUI's menu, close other programs), start ComfyUI with --lowvram, "
            "use a lower precision in Load FiDeSR Model, or give a smaller input image"
        )

    def device(self, networks, weights_device: torch.device, working_bytes: int) -> torch.device:
        if not networks:  # the injections: a few latent-sized maps, no weights
            return model_management.get_torch_device()
        if self.handle is None:
            raise RuntimeError(f"networks {list(networks)} asked for but the runtime has no model")
        patchers = [self.handle.patchers[name] for name in networks]
        whole = not all(self.handle.partial_load[name] for name in networks)
        model_management.load_models_gpu(patchers, memory_required=working_bytes, force_full_load=whole)
        return patchers[0].load_device

    def images_at_once(self, device: torch.device, working_bytes: int, batch: int) -> int:
        return int(model_management.get_free_memory(device) // working_bytes)

    def rest(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(model_management.intermediate_device())

    def is_out_of_memory(self, error: BaseException) -> bool:
        oom = model_management.OOM_EXCEPTION
        # ComfyUI falls back to Exception as OOM_EXCEPTION without CUDA support
        return (oom is not Exception and isinstance(error, oom)) or super().is_out_of_memory(error)

    def after_out_of_memory(self) -> None:
        model_management.soft_empty_cache()
