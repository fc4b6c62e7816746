"""FiDeSR LF Injection and FiDeSR HF Injection (training-free, docs/algorithm.md §4).

Each node adds its branch's delta to ``samples``.  Both deltas are computed
from the state (the restored latent ``z = z_L − r̃``, ``z_L`` and the upscaled
LQ image), never from ``samples``, so the two nodes commute and each can be
used alone.  Strengths are effective strengths: LF 0.1 + HF 0.1 equals the
released script's ``--lf_scale 0.2 --hf_scale 0.2``.
"""

from __future__ import annotations

from typing import Any

from ..fidesr_core.steps.frequency import FILTER_GEOMETRIES
from ..fidesr_core.steps.injection import (
    HighFrequencySettings,
    LowFrequencySettings,
    high_frequency_delta,
    low_frequency_delta,
    spatial_gate,
)
from .errors import engine_errors
from .inputs import CATEGORY
from .latent_state import HF_NODE, LF_NODE, REFINE_NODE, RESIDUAL_NODE, make_latent, read_state, require_residual
from .runtime import check_interrupted

__all__ = ["FiDeSRLowFrequencyInject", "FiDeSRHighFrequencyInject", "low_frequency_step", "high_frequency_step"]

_CONNECT_TO = f"{REFINE_NODE} (or {RESIDUAL_NODE})"


def _float(default: float, low: float, high: float, step: float, tooltip: str) -> tuple[str, dict]:
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


def _strength_input(branch: str) -> tuple[str, dict]:
    return _float(
        0.1,
        0.0,
        2.0,
        0.01,
        f"Effective strength of the {branch} injection; 0 turns it off. LF 0.1 + HF 0.1 equals the authors' script "
        "defaults (--lf_scale 0.2 --hf_scale 0.2, merged 50/50).",
    )


def _order_input(what: str) -> tuple[str, dict]:
    return ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": f"Butterworth order of the {what} (steepness)."})


FILTER_INPUT = (
    list(FILTER_GEOMETRIES),
    {
        "default": "official",
        "tooltip": "official reproduces the released code's Butterworth filter (orientation-selective; the weights "
        "were tuned with it); radial is the rotation-symmetric filter.",
    },
)
CHANNEL_TAU_INPUT = _float(
    0.8,
    0.0,
    1.0,
    0.01,
    "Channel gate threshold: latent channels whose low-pass energy share is above it count as low-frequency ones.",
)
CHANNEL_SHARPNESS_INPUT = _float(10.0, 0.0, 100.0, 0.1, "Channel gate sharpness (slope of its sigmoid).")
GAMMA_TOOLTIP = "Exponent applied to the spatial mask; larger values confine the injection to fewer places."


def _latent_input(what: str) -> tuple[str, dict]:
    return ("LATENT", {"tooltip": f"The output of {REFINE_NODE} (or of another injection node); {what}"})


def _injection_step(latent: Any, settings: LowFrequencySettings | HighFrequencySettings, *, node: str) -> dict:
    """``samples`` plus the branch's delta, computed from the state's restored latent (never from ``samples``)."""
    state = read_state(latent, node, connect_to=_CONNECT_TO)
    require_residual(state, node)
    check_interrupted()
    with engine_errors(node):
        z = state.restored()
        gate = spatial_gate(state.upscaled_lq, tuple(z.shape[-2:]))
        if isinstance(settings, LowFrequencySettings):
            delta, branch = low_frequency_delta(z, state.z_lq, gate, settings), "lf"
        else:
            delta, branch = high_frequency_delta(z, state.z_lq, gate, settings), "hf"
    samples = latent["samples"] + state.to_samples(delta)
    return make_latent(samples, state.with_injection(branch), base=latent)


def low_frequency_step(latent: Any, settings_kwargs: dict[str, Any], *, node: str) -> dict[str, Any]:
    """samples + s_lf · M · M_ch · LPF(z)."""
    with engine_errors(node):
        settings = LowFrequencySettings(**settings_kwargs)
    return _injection_step(latent, settings, node=node)


def high_frequency_step(latent: Any, settings_kwargs: dict[str, Any], *, node: str) -> dict[str, Any]:
    """samples + s_hf · M_sp^γ · (1 − M_ch) · (HPF(z) − HPF(z_L))."""
    with engine_errors(node):
        settings = HighFrequencySettings(**settings_kwargs)
    return _injection_step(latent, settings, node=node)


class FiDeSRLowFrequencyInject:
    DISPLAY_NAME = LF_NODE
    DESCRIPTION = (
        "Training-free low-frequency injection: strengthens the restored latent's structure (its low-pass) where "
        "the input has little detail and the residual was large, in latent channels that carry low frequencies. "
        "Commutes with the HF injection."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latent plus the LF delta.",)
    FUNCTION = "inject"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "latent": _latent_input("its FiDeSR state supplies z_L, the residual and the detail map."),
                "strength": _strength_input("low-frequency"),
                "cutoff": _float(0.10, 0.01, 1.0, 0.01, "Low-pass cutoff as a fraction of the highest frequency."),
                "order": _order_input("low-pass"),
                "channel_tau": CHANNEL_TAU_INPUT,
                "channel_sharpness": CHANNEL_SHARPNESS_INPUT,
                "gamma": _float(1.2, 0.1, 10.0, 0.05, GAMMA_TOOLTIP),
                "filter": FILTER_INPUT,
            }
        }

    def inject(
        self,
        latent: dict[str, Any],
        strength: float = 0.1,
        cutoff: float = 0.10,
        order: int = 2,
        channel_tau: float = 0.8,
        channel_sharpness: float = 10.0,
        gamma: float = 1.2,
        filter: str = "official",  # noqa: A002 - the user-facing input name
    ) -> tuple[dict[str, Any]]:
        settings = {
            "strength": strength,
            "cutoff": cutoff,
            "order": order,
            "channel_tau": channel_tau,
            "channel_sharpness": channel_sharpness,
            "gamma": gamma,
            "filter": filter,
        }
        return (low_frequency_step(latent, settings, node=self.DISPLAY_NAME),)


class FiDeSRHighFrequencyInject:
    DISPLAY_NAME = HF_NODE
    DESCRIPTION = (
        "Training-free high-frequency injection: adds the detail the restored latent gained over the LQ latent "
        "(high-pass difference) where the input has detail, in latent channels that carry high frequencies. "
        "Commutes with the LF injection."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latent plus the HF delta.",)
    FUNCTION = "inject"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "latent": _latent_input("its FiDeSR state supplies z_L, the restored latent and the detail map."),
                "strength": _strength_input("high-frequency"),
                "cutoff": _float(0.32, 0.01, 1.0, 0.01, "High-pass cutoff as a fraction of the highest frequency."),
                "order": _order_input("high-pass"),
                "gamma": _float(1.2, 0.1, 10.0, 0.05, GAMMA_TOOLTIP),
                "channel_cutoff": _float(
                    0.10, 0.01, 1.0, 0.01, "Low-pass cutoff used to measure each channel's low-frequency share."
                ),
                "channel_tau": CHANNEL_TAU_INPUT,
                "channel_sharpness": CHANNEL_SHARPNESS_INPUT,
                "filter": FILTER_INPUT,
            }
        }

    def inject(
        self,
        latent: dict[str, Any],
        strength: float = 0.1,
        cutoff: float = 0.32,
        order: int = 2,
        gamma: float = 1.2,
        channel_cutoff: float = 0.10,
        channel_tau: float = 0.8,
        channel_sharpness: float = 10.0,
        filter: str = "official",  # noqa: A002 - the user-facing input name
    ) -> tuple[dict[str, Any]]:
        settings = {
            "strength": strength,
            "cutoff": cutoff,
            "order": order,
            "gamma": gamma,
            "channel_cutoff": channel_cutoff,
            "channel_tau": channel_tau,
            "channel_sharpness": channel_sharpness,
            "filter": filter,
        }
        return (high_frequency_step(latent, settings, node=self.DISPLAY_NAME),)
