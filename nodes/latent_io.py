"""ComfyUI's LATENT dict <-> the engine's ``LatentState``.

A FiDeSR LATENT stays an ordinary ComfyUI latent: ``samples`` holds UNSCALED
SD 2.1 VAE latents (``z / scaling_factor``), so ComfyUI's own VAE Decode and
previews work on it.  What the later steps need travels under the one extra
key ``"fidesr"`` as the engine's ``LatentState``, resting on
``model_management.intermediate_device()`` as ComfyUI's latents do.  The
engine checks the order of the steps and that ``samples`` still belongs to
the state (same shape, same images; an edit made by another node in between
is kept); this module only names the nodes in those messages.
"""

from __future__ import annotations

from typing import Any

import comfy.model_management as model_management
import torch

from ..fidesr_core.errors import StepOrderError
from ..fidesr_core.latent_state import DECODE, ENCODE, HIGH_FREQUENCY, LOW_FREQUENCY, REFINE, RESIDUAL, LatentState
from .errors import node_error

__all__ = [
    "STATE_KEY",
    "ENCODE_NODE",
    "RESIDUAL_NODE",
    "REFINE_NODE",
    "LF_NODE",
    "HF_NODE",
    "DECODE_NODE",
    "NODE_NAMES",
    "state_of_latent",
    "latent_of_state",
]

STATE_KEY = "fidesr"

# Display names, used in messages that say which node to connect.
ENCODE_NODE = "FiDeSR VAE Encode"
RESIDUAL_NODE = "FiDeSR One-Step U-Net"
REFINE_NODE = "FiDeSR LRRB Refine"
LF_NODE = "FiDeSR LF Injection"
HF_NODE = "FiDeSR HF Injection"
DECODE_NODE = "FiDeSR VAE Decode"
NODE_NAMES = {
    ENCODE: ENCODE_NODE,
    RESIDUAL: RESIDUAL_NODE,
    REFINE: REFINE_NODE,
    LOW_FREQUENCY: LF_NODE,
    HIGH_FREQUENCY: HF_NODE,
    DECODE: DECODE_NODE,
}


def state_of_latent(latent: Any, node: str, *, connect_to: str) -> LatentState:
    """The state of ``latent``, checked to be present and to belong to its ``samples``.

    ``connect_to`` names the node(s) whose output ``node`` should be connected to.
    """
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise node_error(node, f"expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    state = latent.get(STATE_KEY)
    if not isinstance(state, LatentState):
        raise node_error(
            node,
            f"the latent has no FiDeSR state (it did not come from a FiDeSR node); connect it to the output of "
            f"{connect_to}",
        )
    try:
        return state.accept_samples(latent["samples"])
    except StepOrderError as error:
        raise node_error(
            node,
            f"{error}. Connect {node} directly to the output of {connect_to}, without latent "
            "upscale/crop/batch nodes in between",
        ) from error


def latent_of_state(state: LatentState, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new LATENT dict: ``base``'s other keys (if any), the state's ``samples`` and the state."""
    resting = state.to(model_management.intermediate_device())
    latent = dict(base) if base is not None else {}
    latent["samples"] = resting.samples
    latent[STATE_KEY] = resting
    return latent
