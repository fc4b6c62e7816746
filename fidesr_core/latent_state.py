"""What a latent carries between the steps of a one-step restorer, and which step may come next.

A ``LatentState`` is made by the encode step and replaced (never changed) by each
later step.  It holds everything a later step needs, so each step can run in its
own process step (a ComfyUI node) and the order checks live in one place:

* ``z_lq`` — the LQ latent ``z_L`` (scaled) ``[B, 4, h, w]``
* ``upscaled_lq`` — the upscaled LQ image in ``[-1, 1]`` ``[B, 3, 8h, 8w]`` (colour-fix reference)
* ``gate`` — the spatial gate ``M_sp`` ``[B, 1, h, w]`` of that image, computed once per latent
  (docs/algorithm.md §4), or None until an injection needs it
* ``residual`` / ``refined_residual`` — ``r`` and ``r + Δr`` once those steps ran
* ``low_delta`` / ``high_delta`` — what the LF and HF injections added
* ``edit`` — what a tool outside the pipeline changed in between (see ``accept_samples``)

The current latent is always recomputed from those parts in one fixed order
(``latent()``), so a pipeline run in one call and the same steps run one by one
give bit-identical latents, and the two injections commute exactly.

``samples`` is the current latent in the VAE's own (unscaled) units, which is
what ComfyUI's LATENT holds.  The state carries the recipe of the model that
encoded it (``FamilyRecipe``): FiDeSR refines its residual with the LRRB;
PiSA-SR and OSEDiff have none, and the refine step leaves their latents as
they are.  Later steps must run on a model of the same family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .errors import StepOrderError
from .networks.families import FamilyRecipe
from .ops.restoration import restored_latent

__all__ = [
    "ENCODE",
    "RESIDUAL",
    "REFINE",
    "LOW_FREQUENCY",
    "HIGH_FREQUENCY",
    "DECODE",
    "STEP_NAMES",
    "LatentState",
    "latent_fingerprint",
    "mismatched_images",
]

ENCODE, RESIDUAL, REFINE, LOW_FREQUENCY, HIGH_FREQUENCY, DECODE = "encode", "residual", "refine", "lf", "hf", "decode"
# How messages name each step; a front end (the ComfyUI nodes) passes its own names.
STEP_NAMES: Mapping[str, str] = {
    ENCODE: "the VAE encode step",
    RESIDUAL: "the U-Net residual step",
    REFINE: "the LRRB refine step",
    LOW_FREQUENCY: "the LF injection",
    HIGH_FREQUENCY: "the HF injection",
    DECODE: "the VAE decode step",
}

# The fingerprint: per image and channel, the latent averaged down to 8x8 with its mean removed.
# Edits such as scaling or light noise keep its correlation near 1; a latent of another image
# shares little of its layout (about 0 ± 0.1 for unrelated 256-value fingerprints).
_FINGERPRINT_SIDE = 8
_SAME_IMAGE_CORRELATION = 0.5
_FLAT_FINGERPRINT_NORM = 1e-4  # below this an image has no layout to compare (a flat colour)


def latent_fingerprint(latent: torch.Tensor) -> torch.Tensor:
    """``[B, C·64]`` float32: the per-image layout of ``latent`` ``[B, C, h, w]``, for telling images apart."""
    pooled = F.adaptive_avg_pool2d(latent.float(), _FINGERPRINT_SIDE)
    return (pooled - pooled.mean(dim=(2, 3), keepdim=True)).flatten(1)


def mismatched_images(expected: torch.Tensor, received: torch.Tensor) -> list[int]:
    """Indices of the images of ``received`` whose layout does not match ``expected`` (same shape)."""
    a, b = latent_fingerprint(expected), latent_fingerprint(received.to(expected.device))
    norm_a, norm_b = torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1)
    correlation = (a * b).sum(dim=1) / (norm_a * norm_b).clamp_min(1e-12)
    flat = torch.maximum(norm_a, norm_b) < _FLAT_FINGERPRINT_NORM
    return [int(index) for index in torch.nonzero(~flat & (correlation < _SAME_IMAGE_CORRELATION)).flatten()]


def _add(total: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    return delta.float() if total is None else total + delta.float()


@dataclass(frozen=True, eq=False)
class LatentState:
    recipe: FamilyRecipe  # of the model that encoded it
    z_lq: torch.Tensor  # [B, 4, h, w], scaled
    upscaled_lq: torch.Tensor  # [B, 3, 8h, 8w] in [-1, 1]
    output_size: tuple[int, int]
    scaling_factor: float
    gate: torch.Tensor | None = None  # [B, 1, h, w], M_sp
    residual: torch.Tensor | None = None  # r
    refined_residual: torch.Tensor | None = None  # r + Δr
    low_delta: torch.Tensor | None = None
    high_delta: torch.Tensor | None = None
    edit: torch.Tensor | None = None  # scaled change made outside the pipeline
    steps: tuple[str, ...] = (ENCODE,)
    samples: torch.Tensor | None = None  # latent() / scaling_factor, set by every constructor below

    # ------------------------------------------------------------------ construction and transitions

    @classmethod
    def encoded(
        cls,
        recipe: FamilyRecipe,
        z_lq: torch.Tensor,
        upscaled_lq: torch.Tensor,
        output_size: tuple[int, int],
        scaling_factor: float,
        gate: torch.Tensor | None = None,
    ) -> LatentState:
        state = cls(
            recipe=recipe,
            z_lq=z_lq.float(),
            upscaled_lq=upscaled_lq.float(),
            output_size=(int(output_size[0]), int(output_size[1])),
            scaling_factor=float(scaling_factor),
            gate=None if gate is None else gate.float(),
        )
        return state._with_samples()

    def _with_samples(self) -> LatentState:
        return replace(self, samples=self.latent() / self.scaling_factor)

    def _next(self, step: str, **changes: torch.Tensor | None) -> LatentState:
        return replace(self, steps=(*self.steps, step), **changes)._with_samples()

    def with_residual(self, residual: torch.Tensor) -> LatentState:
        return self._next(RESIDUAL, residual=residual.float().to(self.z_lq.device))

    def with_refined_residual(self, refined: torch.Tensor) -> LatentState:
        return self._next(REFINE, refined_residual=refined.float().to(self.z_lq.device))

    def with_injection(self, branch: str, delta: torch.Tensor) -> LatentState:
        """Add an LF (``"lf"``) or HF (``"hf"``) delta; the same branch twice adds twice."""
        delta = delta.to(self.z_lq.device)
        if branch == LOW_FREQUENCY:
            return self._next(branch, low_delta=_add(self.low_delta, delta))
        if branch == HIGH_FREQUENCY:
            return self._next(branch, high_delta=_add(self.high_delta, delta))
        raise ValueError(f"unknown injection branch {branch!r}")

    def with_gate(self, gate: torch.Tensor) -> LatentState:
        return replace(self, gate=gate.float().to(self.z_lq.device))

    def to(self, device: torch.device | str) -> LatentState:
        """Every tensor on ``device`` (where the state rests between steps)."""
        moved = {
            name: getattr(self, name).to(device)
            for name in (
                "z_lq",
                "upscaled_lq",
                "gate",
                "residual",
                "refined_residual",
                "low_delta",
                "high_delta",
                "edit",
                "samples",
            )
            if getattr(self, name) is not None
        }
        return replace(self, **moved)

    # ------------------------------------------------------------------ the current latent

    @property
    def batch_size(self) -> int:
        return int(self.z_lq.shape[0])

    @property
    def current_residual(self) -> torch.Tensor | None:
        """``r + Δr`` after the refine step, else ``r``, else None."""
        return self.refined_residual if self.refined_residual is not None else self.residual

    def restored(self) -> torch.Tensor:
        """``z = z_L − r̃`` (``r`` when the refine step was left out): what the injections start from."""
        residual = self.current_residual
        return self.z_lq if residual is None else restored_latent(self.z_lq, residual)

    def latent(self) -> torch.Tensor:
        """The current scaled latent: ``z`` plus the LF delta, the HF delta and any outside edit, in that order."""
        latent = self.restored().float()
        for part in (self.low_delta, self.high_delta, self.edit):
            if part is not None:
                latent = latent + part
        return latent

    def accept_samples(self, samples: torch.Tensor) -> LatentState:
        """The state for ``samples`` (unscaled) that arrived with it.

        The samples this state produced pass unchanged.  Samples another tool
        changed are kept as an edit if they still show the same images (the
        fingerprint); a different shape, or another image of the same shape,
        raises ``StepOrderError``.
        """
        expected = self.samples
        assert expected is not None  # every constructor sets it
        if samples is expected:
            return self
        if tuple(samples.shape) != tuple(expected.shape):
            raise StepOrderError(
                f"the latent's samples have shape {list(samples.shape)} but its {self.recipe.name} state was made "
                f"for {list(expected.shape)}; a node in between changed the latent's size or batch"
            )
        received = samples.detach().to(device=expected.device, dtype=torch.float32)
        if torch.equal(received, expected):
            return self
        different = mismatched_images(expected, received)
        if different:
            which = ", ".join(str(index + 1) for index in different)
            what = (
                f"image {which} of {self.batch_size} is not the image"
                if len(different) == 1
                else (f"images {which} of {self.batch_size} are not the images")
            )
            raise StepOrderError(
                f"{what} the latent's {self.recipe.name} state was made for; a node in between swapped, "
                "re-ordered or replaced the latent's images"
            )
        without_edit = replace(self, edit=None).latent()
        return replace(self, edit=received * self.scaling_factor - without_edit, samples=received)

    # ------------------------------------------------------------------ the order of the steps

    def check_next(self, step: str, names: Mapping[str, str] = STEP_NAMES) -> None:
        """Raise ``StepOrderError`` unless ``step`` may run on this state."""
        if step == RESIDUAL:
            if RESIDUAL in self.steps:
                raise StepOrderError(
                    f"the latent already went through {names[RESIDUAL]}; connect the output of {names[ENCODE]} instead"
                )
            return
        if step in (REFINE, LOW_FREQUENCY, HIGH_FREQUENCY) and RESIDUAL not in self.steps:
            after = names[RESIDUAL] if step == REFINE else f"{names[REFINE]} (or {names[RESIDUAL]})"
            raise StepOrderError(
                f"the latent has not been through {names[RESIDUAL]} yet; put {names[step]} after {after}"
            )
        if step == REFINE:
            self._check_refine(names)

    def check_model(self, recipe: FamilyRecipe, step_name: str) -> None:
        """Raise ``StepOrderError`` unless a model with ``recipe`` may run a step on this state (same family)."""
        if recipe.family != self.recipe.family:
            raise StepOrderError(
                f"the latent was encoded by the {self.recipe.name} model but {step_name} got the {recipe.name} model; "
                "connect the same model to every step of one image"
            )

    def _check_refine(self, names: Mapping[str, str]) -> None:
        if not self.recipe.uses_lrrb:  # the step passes the latent through: its place does not matter
            return
        if REFINE in self.steps:
            raise StepOrderError(
                f"the latent already went through {names[REFINE]}; connect the output of {names[RESIDUAL]} instead"
            )
        if LOW_FREQUENCY in self.steps or HIGH_FREQUENCY in self.steps:
            raise StepOrderError(
                f"the latent already has frequency injection applied; put {names[REFINE]} before "
                f"{names[LOW_FREQUENCY]} and {names[HIGH_FREQUENCY]}"
            )
