"""FiDeSR LF Injection and FiDeSR HF Injection (training-free, docs/algorithm.md §4): each adds its branch's
delta, computed from the chain state (never from ``samples``), so the two commute and each can be used alone.
"""

from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import io

from ..fidesr_core.pipeline import injection_stage
from ..fidesr_core.settings import HighFrequencySettings, LowFrequencySettings
from .chain import NODE_OF_STAGE, check_stage, latent_of_state, state_of_latent
from .errors import engine_errors
from .inputs import latent_output, number_input, schema, shared_inputs
from .runtime import ComfyRuntime

_CONNECT_TO = f"{NODE_OF_STAGE['refine']} (or {NODE_OF_STAGE['residual']})"


def _branch_inputs(branch: str, supplies: str, cutoff: float, what: str) -> list[io.Input]:
    """The latent, strength, cutoff and order inputs every branch starts with."""
    return [
        io.Latent.Input(
            "latent",
            tooltip=f"The output of {NODE_OF_STAGE['refine']} (or of another injection node); its FiDeSR state "
            f"supplies {supplies}.",
        ),
        number_input(
            *("strength", 0.1, 0.0, 2.0, 0.01),
            f"Effective strength of the {branch} injection; 0 turns it off. LF 0.1 + HF 0.1 equals the authors' "
            "script defaults (--lf_scale 0.2 --hf_scale 0.2, merged 50/50).",
        ),
        number_input("cutoff", cutoff, 0.01, 1.0, 0.01, f"{what} cutoff as a fraction of the highest frequency."),
        io.Int.Input("order", default=2, min=1, max=8, tooltip=f"Butterworth order of the {what.lower()} (steepness)."),
    ]


class _Injection(io.ComfyNode):
    """An injection node: every input but ``latent`` is a field of its branch's settings (``SETTINGS``)."""

    STAGE: str
    SETTINGS: type[LowFrequencySettings | HighFrequencySettings]
    ABOUT: str  # the node's description

    @classmethod
    def define_schema(cls) -> io.Schema:
        output = latent_output(f"The latent plus the {cls.STAGE.upper()} delta.")
        return schema(cls.__name__, NODE_OF_STAGE[cls.STAGE], cls.ABOUT, cls.branch_inputs(), [output])

    @classmethod
    def execute(cls, latent: dict[str, Any], **settings: Any) -> io.NodeOutput:
        node = NODE_OF_STAGE[cls.STAGE]
        state = state_of_latent(latent, node, connect_to=_CONNECT_TO)
        check_stage(state, cls.STAGE, None)
        with engine_errors(node):
            latents = injection_stage(state.latents, cls.SETTINGS(**settings), ComfyRuntime())
        return io.NodeOutput(latent_of_state(state.after(cls.STAGE, latents), base=latent))


class FiDeSRLowFrequencyInject(_Injection):
    STAGE, SETTINGS = "lf", LowFrequencySettings
    ABOUT = (
        "Training-free low-frequency injection: strengthens the restored latent's structure (its low-pass) where "
        "the input has little detail and the residual was large, in latent channels that carry low frequencies. "
        "Commutes with the HF injection."
    )

    @classmethod
    def branch_inputs(cls) -> list[io.Input]:
        return [
            *_branch_inputs("low-frequency", "z_L, the residual and the detail map", 0.10, "Low-pass"),
            *shared_inputs("channel_tau", "channel_sharpness", "gamma", "filter"),
        ]


class FiDeSRHighFrequencyInject(_Injection):
    STAGE, SETTINGS = "hf", HighFrequencySettings
    ABOUT = (
        "Training-free high-frequency injection: adds the detail the restored latent gained over the LQ latent "
        "(high-pass difference) where the input has detail, in latent channels that carry high frequencies. "
        "Commutes with the LF injection."
    )

    @classmethod
    def branch_inputs(cls) -> list[io.Input]:
        return [
            *_branch_inputs("high-frequency", "z_L, the restored latent and the detail map", 0.32, "High-pass"),
            *shared_inputs("gamma"),
            number_input(
                *("channel_cutoff", 0.10, 0.01, 1.0, 0.01),
                "Low-pass cutoff used to measure each channel's low-frequency share.",
            ),
            *shared_inputs("channel_tau", "channel_sharpness", "filter"),
        ]
