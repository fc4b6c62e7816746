"""The FiDeSR state that rides along in a ComfyUI LATENT.

A LATENT stays an ordinary ComfyUI latent: ``samples`` holds UNSCALED SD 2.1
VAE latents (``z / scaling_factor``), so ComfyUI's own VAE Decode and previews
work on it.  What the later FiDeSR steps need travels under the one extra key
``"fidesr"`` as a ``FiDeSRLatentState`` (all tensors float32 on the CPU):

* ``z_lq`` — the LQ latent ``z_L`` (scaled, as the engine computes) ``[B, 4, h, w]``
* ``upscaled_lq`` — the upscaled LQ image in ``[-1, 1]`` ``[B, 3, 8h, 8w]``
  (detail map for the injections, reference for the colour fix)
* ``output_size`` — the final (height, width)
* ``residual`` — the U-Net residual ``r``, once FiDeSR One-Step U-Net ran
* ``refined_residual`` — ``r + Δr``, once FiDeSR LRRB Refine ran
* ``injections`` — the frequency injections applied so far

Every FiDeSR latent node adds its own change to ``samples`` (U-Net ``−r``,
LRRB ``−Δr``, injections ``+δ``), so on the usual chain ``samples`` is exactly
the engine's latent in ComfyUI's units, and edits made by other nodes in
between are kept.  A node that needs the state checks it is there and still
matches ``samples`` (another node may have resized or re-batched the latent).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..fidesr_core.steps.restoration import restored_latent
from .errors import node_error

__all__ = [
    "STATE_KEY",
    "ENCODE_NODE",
    "RESIDUAL_NODE",
    "REFINE_NODE",
    "LF_NODE",
    "HF_NODE",
    "DECODE_NODE",
    "FiDeSRLatentState",
    "make_latent",
    "read_state",
    "require_residual",
]

STATE_KEY = "fidesr"

# Display names, used in messages that say which node to connect.
ENCODE_NODE = "FiDeSR VAE Encode"
RESIDUAL_NODE = "FiDeSR One-Step U-Net"
REFINE_NODE = "FiDeSR LRRB Refine"
LF_NODE = "FiDeSR LF Injection"
HF_NODE = "FiDeSR HF Injection"
DECODE_NODE = "FiDeSR VAE Decode"


def _cpu_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class FiDeSRLatentState:
    z_lq: torch.Tensor  # [B, 4, h, w], scaled latent z_L
    upscaled_lq: torch.Tensor  # [B, 3, 8h, 8w] in [-1, 1]
    output_size: tuple[int, int]
    scaling_factor: float
    residual: torch.Tensor | None = None  # r, [B, 4, h, w]
    refined_residual: torch.Tensor | None = None  # r + Δr, [B, 4, h, w]
    injections: tuple[str, ...] = ()

    @classmethod
    def from_encoding(
        cls, z_lq: torch.Tensor, upscaled_lq: torch.Tensor, output_size: tuple[int, int], scaling_factor: float
    ) -> FiDeSRLatentState:
        return cls(
            z_lq=_cpu_float(z_lq),
            upscaled_lq=_cpu_float(upscaled_lq),
            output_size=(int(output_size[0]), int(output_size[1])),
            scaling_factor=float(scaling_factor),
        )

    def with_residual(self, residual: torch.Tensor) -> FiDeSRLatentState:
        return replace(self, residual=_cpu_float(residual), refined_residual=None)

    def with_refined_residual(self, refined: torch.Tensor) -> FiDeSRLatentState:
        return replace(self, refined_residual=_cpu_float(refined))

    def with_injection(self, name: str) -> FiDeSRLatentState:
        return replace(self, injections=(*self.injections, name))

    @property
    def current_residual(self) -> torch.Tensor | None:
        """``r + Δr`` after LRRB Refine, else ``r``, else None."""
        return self.refined_residual if self.refined_residual is not None else self.residual

    def restored(self) -> torch.Tensor:
        """``z = z_L − r̃`` (``r`` when LRRB Refine was skipped): what the injections start from."""
        residual = self.current_residual
        if residual is None:
            raise RuntimeError("restored() needs a residual")  # callers check first
        return restored_latent(self.z_lq, residual)

    def to_samples(self, scaled: torch.Tensor) -> torch.Tensor:
        """A scaled latent (or change of one) in ComfyUI's unscaled units."""
        return _cpu_float(scaled) / self.scaling_factor

    def from_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """ComfyUI's unscaled ``samples`` as the engine's scaled latent."""
        return _cpu_float(samples) * self.scaling_factor


def make_latent(samples: torch.Tensor, state: FiDeSRLatentState, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new LATENT dict: ``base``'s other keys (if any), the new ``samples`` and the state."""
    latent = dict(base) if base is not None else {}
    latent["samples"] = _cpu_float(samples)
    latent[STATE_KEY] = state
    return latent


def read_state(latent: Any, node: str, *, connect_to: str) -> FiDeSRLatentState:
    """The state of ``latent``, checked to be present and to match ``samples``.

    ``connect_to`` names the node(s) whose output ``node`` should be connected to.
    """
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise node_error(node, f"expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    state = latent.get(STATE_KEY)
    if not isinstance(state, FiDeSRLatentState):
        raise node_error(
            node,
            f"the latent has no FiDeSR state (it did not come from a FiDeSR node); connect it to the output of "
            f"{connect_to}",
        )
    samples_shape = tuple(latent["samples"].shape)
    state_shape = tuple(state.z_lq.shape)
    if samples_shape != state_shape:
        raise node_error(
            node,
            f"the latent's samples have shape {list(samples_shape)} but its FiDeSR state was made for "
            f"{list(state_shape)}; a node in between changed the latent's size or batch. Connect {node} directly "
            f"to the output of {connect_to}, without latent upscale/crop/batch nodes in between",
        )
    return state


def require_residual(state: FiDeSRLatentState, node: str) -> None:
    """Refinement and injections work on the U-Net residual."""
    if state.residual is None:
        raise node_error(
            node,
            f"the latent has not been through {RESIDUAL_NODE} yet; connect {node} after {RESIDUAL_NODE} "
            f"(or {REFINE_NODE})",
        )
