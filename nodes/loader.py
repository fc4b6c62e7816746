"""Load FiDeSR Model: SD 2.1-base plus the FiDeSR weights, as one ``FIDESR_MODEL``.

``precision = auto`` follows ComfyUI's own choice of U-Net dtype for its torch
device (``model_management.unet_dtype``), so ``--cpu``, ``--force-fp16``,
``--fp32-unet``, ``--bf16-unet`` and MPS behave as they do for ComfyUI's
models.  The model is assembled on ComfyUI's offload device; its networks go
to ComfyUI's memory manager (see ``model_handle``), which loads each onto the
torch device when a node needs it.  ComfyUI caches node outputs, so the same
inputs never load twice.
"""

from __future__ import annotations

import logging

import comfy.model_management as model_management
import torch
from comfy_api.v0_0_2 import io

from ..fidesr_core.precision import PRECISIONS, dtype_name
from .errors import engine_errors, node_error
from .inputs import CATEGORY, FiDeSRModelType
from .model_folders import base_model_choices, fidesr_weight_choices, resolve_base_model, resolve_fidesr_weights
from .model_handle import FiDeSRModelHandle

__all__ = ["FiDeSRModelLoader", "auto_precision", "loader_choices"]

logger = logging.getLogger("FiDeSR")

_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def auto_precision(device: torch.device) -> str:
    """ComfyUI's U-Net dtype for ``device`` as a precision name; dtypes FiDeSR cannot run give fp32."""
    dtype = model_management.unet_dtype(device=device, supported_dtypes=list(_COMPUTE_DTYPES))
    if dtype not in _COMPUTE_DTYPES:
        logger.info("FiDeSR cannot compute in %s (chosen by ComfyUI's flags); using fp32", dtype)
        dtype = torch.float32
    return dtype_name(dtype)


def loader_choices() -> dict[str, list[str]]:
    """The loader's lists, read afresh each time ComfyUI describes the node (new files show up on refresh)."""
    return {
        "base_model": base_model_choices(),
        "fidesr_weights": fidesr_weight_choices(),
        "precision": list(PRECISIONS),
    }


class FiDeSRModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = loader_choices()
        return io.Schema(
            node_id="FiDeSRModelLoader",
            display_name="Load FiDeSR Model",
            category=CATEGORY,
            description="Loads Stable Diffusion 2.1-base and the FiDeSR weights (LoRA merged into the U-Net, plus "
            "the LRRB) as one FiDeSR model. Put fidesr.pkl in models/fidesr/, and SD 2.1-base as a diffusers folder "
            "in models/diffusers/ or as v2-1_512-ema-pruned.safetensors in models/checkpoints/.",
            inputs=[
                io.Combo.Input(
                    "base_model",
                    options=choices["base_model"],
                    tooltip="Stable Diffusion 2.1-base (512 px): diffusers/<folder> from models/diffusers, "
                    "or checkpoints/<file> from models/checkpoints (v2-1_512-ema-pruned.safetensors).",
                ),
                io.Combo.Input(
                    "fidesr_weights",
                    options=choices["fidesr_weights"],
                    tooltip="FiDeSR weights from models/fidesr: the authors' fidesr.pkl or a .safetensors copy.",
                ),
                io.Combo.Input(
                    "precision",
                    options=choices["precision"],
                    default="auto",
                    tooltip="Compute precision of the U-Net and VAE. auto follows ComfyUI's choice for the "
                    "device (fp16 on most GPUs and MPS, fp32 with --cpu; honours --force-fp16, --fp32-unet, "
                    "--bf16-unet).",
                ),
            ],
            outputs=[
                FiDeSRModelType.Output(
                    display_name="model", tooltip="The FiDeSR model: connect it to the other FiDeSR nodes."
                )
            ],
        )

    @classmethod
    def execute(cls, base_model: str, fidesr_weights: str, precision: str = "auto") -> io.NodeOutput:
        node = "Load FiDeSR Model"
        if precision not in PRECISIONS:
            raise node_error(node, f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        base_path = resolve_base_model(base_model, node)
        weights_path = resolve_fidesr_weights(fidesr_weights, node)
        load_device = model_management.get_torch_device()
        offload_device = model_management.unet_offload_device()
        chosen = auto_precision(load_device) if precision == "auto" else precision
        # diffusers and transformers take seconds to import: pay for them when a model is loaded,
        # not at every ComfyUI start.
        from ..fidesr_core.loading.assemble import assemble_fidesr_model
        from ..fidesr_core.loading.base_model import load_base_model
        from ..fidesr_core.loading.weights import load_fidesr_weights

        with engine_errors(node):
            weights = load_fidesr_weights(weights_path)
            weights.metadata.setdefault("path", weights_path)
            model = assemble_fidesr_model(load_base_model(base_path), weights, precision=chosen, device=offload_device)
        logger.info("FiDeSR: loaded %s + %s in %s, runs on %s", base_model, fidesr_weights, chosen, load_device)
        return io.NodeOutput(FiDeSRModelHandle.wrap(model, base_name=base_model, weights_name=fidesr_weights))
