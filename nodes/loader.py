"""Load FiDeSR Model: SD 2.1-base plus FiDeSR, PiSA-SR or OSEDiff weights (the family told from the file).

``precision = auto`` follows ComfyUI's U-Net dtype for its device, so its flags (``--cpu``, ``--force-fp16``
...) behave as for ComfyUI's models.  The model is assembled on ComfyUI's offload device.
"""

from __future__ import annotations

import logging

import comfy.model_management as model_management
import torch
from comfy_api.v0_0_2 import io, ui

from ..fidesr_core.precision import PRECISIONS, dtype_name
from .errors import engine_errors
from .inputs import FiDeSRModelType, schema
from .model_folders import (
    BASE_SOURCES,
    FIDESR_FOLDER,
    WEIGHTS_SOURCES,
    base_model_choices,
    fidesr_weight_choices,
    folder_list,
    known_file_of,
    resolve_base_model,
    resolve_fidesr_weights,
)
from .model_handle import FiDeSRModelHandle

LOADER_NODE = "Load FiDeSR Model"

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


def _choice_problem(name: str, value: str, choices: list[str], folders: str, what: str, sources: str) -> str | None:
    """ComfyUI's list check for a file input, plus download entries listed earlier (their file may be here now)."""
    if value in choices or known_file_of(value):
        return None
    return f"{name} {value!r} is not in the {folders}; put {what} there ({sources}) and refresh (R)"


def weights_choice_problem(fidesr_weights: str) -> str | None:
    """What is wrong with the chosen weights file, or None."""
    folders = f"fidesr model folders ({folder_list(FIDESR_FOLDER)})"
    return _choice_problem("fidesr_weights", fidesr_weights, fidesr_weight_choices(), folders, "it", WEIGHTS_SOURCES)


class FiDeSRModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = loader_choices()
        return schema(
            "FiDeSRModelLoader",
            LOADER_NODE,
            "Loads Stable Diffusion 2.1-base and the weights of one of three one-step restorers on it, "
            "told from the file: FiDeSR (fidesr.pkl; LoRA U-Net plus LRRB), PiSA-SR (pisa_sr.pkl; pixel and "
            "semantic LoRA sets) or OSEDiff (osediff.pkl; U-Net and VAE-encoder LoRA). The family it found is "
            "shown on the node after it runs and in ComfyUI's log. Put the weights in models/fidesr/, and SD "
            "2.1-base as v2-1_512-ema-pruned.safetensors in models/checkpoints/ or as a diffusers folder in "
            "models/diffusers/. While those folders lack them, the lists offer the released files as "
            "'(download from ...)' entries: choosing one fetches the file on the next run (nothing is fetched "
            "otherwise).",
            [
                io.Combo.Input(
                    "base_model",
                    options=choices["base_model"],
                    tooltip="Stable Diffusion 2.1-base (512 px): diffusers/<folder> from models/diffusers, "
                    "or checkpoints/<file> from models/checkpoints (v2-1_512-ema-pruned.safetensors). While no "
                    "checkpoint has that name, the '(download from ...)' entry fetches it into models/checkpoints "
                    "when the workflow runs.",
                ),
                io.Combo.Input(
                    "fidesr_weights",
                    options=choices["fidesr_weights"],
                    tooltip="Weights from models/fidesr: FiDeSR's fidesr.pkl, PiSA-SR's pisa_sr.pkl, OSEDiff's "
                    "osediff.pkl, or a .safetensors copy of any (the family is told from the file). While the "
                    "folder is empty, the '(download from jmjin2/FiDeSR)' entry fetches fidesr.pkl when the "
                    "workflow runs.",
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
            [
                FiDeSRModelType.Output(
                    display_name="model",
                    tooltip="The restorer (FiDeSR, PiSA-SR or OSEDiff): connect it to the other FiDeSR nodes.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, base_model: str, fidesr_weights: str) -> bool | str:
        folders = f"checkpoints ({folder_list('checkpoints')}) or diffusers ({folder_list('diffusers')}) model folders"
        return (
            weights_choice_problem(fidesr_weights)
            or _choice_problem(
                "base_model", base_model, base_model_choices(), folders, "Stable Diffusion 2.1-base", BASE_SOURCES
            )
            or True
        )

    @classmethod
    def execute(cls, base_model: str, fidesr_weights: str, precision: str = "auto") -> io.NodeOutput:
        node = LOADER_NODE
        base_path = resolve_base_model(base_model, node)
        weights_path = resolve_fidesr_weights(fidesr_weights, node)
        load_device = model_management.get_torch_device()
        chosen = auto_precision(load_device) if precision == "auto" else precision
        # diffusers and transformers take seconds to import: paid when a model is loaded, not at ComfyUI's start
        from ..fidesr_core.loading.base_model import load_base_model
        from ..fidesr_core.loading.restorer import assemble_restorer
        from ..fidesr_core.loading.weights import load_restorer_weights

        with engine_errors(node, sources=WEIGHTS_SOURCES):
            weights = load_restorer_weights(weights_path)
            weights.metadata.setdefault("path", weights_path)
        with engine_errors(node, sources=BASE_SOURCES):
            base = load_base_model(base_path)
        with engine_errors(node):
            model = assemble_restorer(base, weights, precision=chosen, device=model_management.unet_offload_device())
        handle = FiDeSRModelHandle.wrap(model, base_name=base_model, weights_name=fidesr_weights)
        summary = f"{handle.family_name}: {fidesr_weights} on {base_model}, {chosen}, runs on {load_device}"
        logger.info("FiDeSR pack loaded %s", summary)
        return io.NodeOutput(handle, ui=ui.PreviewText(summary))
