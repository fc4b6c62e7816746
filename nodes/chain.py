"""The ``ChainState`` a FiDeSR LATENT carries between the chain nodes, and the checks that keep a chain sound.

``samples`` stay ordinary unscaled SD 2.1 latents; an edit another node made to them is kept while the
fingerprint still shows the same images, otherwise refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import comfy.model_management as model_management
import torch
import torch.nn.functional as F

from ..fidesr_core.networks.families import FamilyRecipe
from ..fidesr_core.pipeline import Latents
from .errors import node_error

STATE_KEY = "fidesr"
# The node that runs each stage, as messages name it.
NODE_OF_STAGE = {
    "encode": "FiDeSR VAE Encode",
    "residual": "FiDeSR One-Step U-Net",
    "refine": "FiDeSR LRRB Refine",
    "lf": "FiDeSR LF Injection",
    "hf": "FiDeSR HF Injection",
    "decode": "FiDeSR VAE Decode",
}

# The fingerprint: per image and channel, the latent averaged down to 8x8, mean removed.  Scaling or light noise
# keep its correlation near 1; another image's shares little of its layout (about 0 ± 0.1 for 256 values).
_FINGERPRINT_SIDE = 8
_SAME_IMAGE_CORRELATION = 0.5
_FLAT_FINGERPRINT_NORM = 1e-4  # below this an image has no layout to compare (a flat colour)


def _fingerprint(latent: torch.Tensor) -> torch.Tensor:
    """``[B, C·64]`` float32: the per-image layout of ``latent`` ``[B, C, h, w]``."""
    pooled = F.adaptive_avg_pool2d(latent.float(), _FINGERPRINT_SIDE)
    return (pooled - pooled.mean(dim=(2, 3), keepdim=True)).flatten(1)


def mismatched_images(expected: torch.Tensor, received: torch.Tensor) -> list[int]:
    """Indices of the images of ``received`` whose layout does not match ``expected`` (same shape)."""
    a, b = _fingerprint(expected), _fingerprint(received.to(expected.device))
    norm_a, norm_b = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    correlation = (a * b).sum(dim=1) / (norm_a * norm_b).clamp_min(1e-12)
    flat = torch.maximum(norm_a, norm_b) < _FLAT_FINGERPRINT_NORM
    return [int(index) for index in torch.nonzero(~flat & (correlation < _SAME_IMAGE_CORRELATION)).flatten()]


@dataclass(frozen=True, eq=False)
class ChainState:
    latents: Latents
    recipe: FamilyRecipe  # of the model that encoded the latents
    scaling_factor: float
    samples: torch.Tensor  # what the LATENT's samples held when this state was made (unscaled)
    stages: tuple[str, ...] = ("encode",)
    edit: torch.Tensor | None = None  # scaled change made by a node outside the chain

    @classmethod
    def encoded(cls, latents: Latents, recipe: FamilyRecipe, scaling_factor: float) -> ChainState:
        return cls(latents, recipe, scaling_factor, latents.latent() / scaling_factor)

    def latent(self) -> torch.Tensor:
        """The current scaled latent: the engine's, then the edit."""
        latent = self.latents.latent()
        return latent if self.edit is None else latent + self.edit

    def after(self, stage: str, latents: Latents) -> ChainState:
        state = replace(self, latents=latents, stages=(*self.stages, stage))
        return replace(state, samples=state.latent() / self.scaling_factor)

    def accept_samples(self, samples: torch.Tensor, node: str, connect_to: str) -> ChainState:
        """The state for ``samples`` (unscaled) that arrived with it: unchanged, edited (kept), or refused."""
        expected = self.samples
        if samples is expected:
            return self
        hint = (
            f"Connect {node} directly to the output of {connect_to}, without latent upscale/crop/batch nodes in between"
        )
        if tuple(samples.shape) != tuple(expected.shape):
            raise node_error(
                node,
                f"the latent's samples have shape {list(samples.shape)} but its {self.recipe.name} state was made "
                f"for {list(expected.shape)}; a node in between changed the latent's size or batch. {hint}",
            )
        received = samples.detach().to(device=expected.device, dtype=torch.float32)
        if torch.equal(received, expected):
            return self
        if different := mismatched_images(expected, received):
            which, count = ", ".join(str(index + 1) for index in different), expected.shape[0]
            what = (
                f"image {which} of {count} is not the image"
                if len(different) == 1
                else f"images {which} of {count} are not the images"
            )
            raise node_error(
                node,
                f"{what} the latent's {self.recipe.name} state was made for; a node in between swapped, re-ordered "
                f"or replaced the latent's images. {hint}",
            )
        return replace(self, edit=received * self.scaling_factor - self.latents.latent(), samples=received)

    def to(self, device: torch.device) -> ChainState:
        edit = None if self.edit is None else self.edit.to(device)
        return replace(self, latents=self.latents.to(device), samples=self.samples.to(device), edit=edit)


def state_of_latent(latent: Any, node: str, *, connect_to: str) -> ChainState:
    """The state of ``latent``, checked to be present and to belong to its ``samples``."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise node_error(node, f"expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    state = latent.get(STATE_KEY)
    if not isinstance(state, ChainState):
        raise node_error(
            node,
            f"the latent has no FiDeSR state (it did not come from a FiDeSR node); connect it to the output of "
            f"{connect_to}",
        )
    return state.accept_samples(latent["samples"], node, connect_to)


def check_stage(state: ChainState, stage: str, recipe: FamilyRecipe | None) -> None:
    """Raise a node error unless ``stage`` may run next on ``state`` with a model of ``recipe`` (None: no model)."""
    node, names, done = NODE_OF_STAGE[stage], NODE_OF_STAGE, state.stages
    if stage == "residual" and "residual" in done:
        problem = (
            f"the latent already went through {names['residual']}; connect the output of {names['encode']} instead"
        )
    elif stage != "residual" and "residual" not in done:
        after = names["residual"] if stage == "refine" else f"{names['refine']} (or {names['residual']})"
        problem = f"the latent has not been through {names['residual']} yet; put {node} after {after}"
    elif stage == "refine" and state.recipe.uses_lrrb and "refine" in done:
        problem = f"the latent already went through {node}; connect the output of {names['residual']} instead"
    elif stage == "refine" and state.recipe.uses_lrrb and ("lf" in done or "hf" in done):
        problem = (
            f"the latent already has frequency injection applied; put {node} before {names['lf']} and {names['hf']}"
        )
    elif recipe is not None and recipe.family != state.recipe.family:
        problem = (
            f"the latent was encoded by the {state.recipe.name} model but {node} got the {recipe.name} model; "
            "connect the same model to every node of one image"
        )
    else:
        return
    raise node_error(node, problem)


def latent_of_state(state: ChainState, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new LATENT dict: ``base``'s other keys (if any), the state's ``samples`` and the state."""
    resting = state.to(model_management.intermediate_device())
    return {**(base or {}), "samples": resting.samples, STATE_KEY: resting}
