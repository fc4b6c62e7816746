"""What a single model file is: one table of rules over key names, shapes, top-level keys and metadata.

``FILE_RULES`` is read top to bottom and the first rule whose condition holds
names the file's ``ModelFamily``; its description is filled in with what the
condition found (``{evidence}``).  Base-model identification and the FiDeSR
weights reader both ask this table, so a file is told apart the same way
wherever it is given.  To recognise another kind of file, add a ``ModelFamily``
member and a row (before any broader row that would also match it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .checkpoint_files import Container, OpenedCheckpoint
from .key_conditions import (
    AllOf,
    AnyOf,
    FileNameContains,
    HasKey,
    HasKeyContaining,
    HasKeyMatching,
    HasKeyStartingWith,
    KeyCondition,
    KeyCount,
    KeyRank,
    KeyShape,
    MetadataContains,
    MetadataIs,
    Not,
    NoTensors,
    TopLevelKey,
    TopLevelKeyEndingWith,
)

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "OPEN_CLIP_PREFIX",
    "CHANNEL_VARIANTS",
    "ModelFamily",
    "ModelIdentity",
    "FileNote",
    "FileRule",
    "FILE_RULES",
    "match_file_rules",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."


class ModelFamily(str, Enum):
    """What a model file or folder holds."""

    SD2 = "sd2"
    SD2_768_V = "sd2-768-v"
    SD2_INPAINTING = "sd2-inpainting"
    SD2_DEPTH = "sd2-depth"
    SD2_X4_UPSCALER = "sd2-x4-upscaler"
    SD2_INSTRUCT_PIX2PIX = "sd2-instruct-pix2pix"
    SD2_OTHER_INPUT = "sd2-other-input"
    SD2_UNCLIP = "sd2-unclip"
    SD1 = "sd1"
    SD1_INPAINTING = "sd1-inpainting"
    SD1_DEPTH = "sd1-depth"
    SD1_X4_UPSCALER = "sd1-x4-upscaler"
    SD1_INSTRUCT_PIX2PIX = "sd1-instruct-pix2pix"
    SD1_OTHER_INPUT = "sd1-other-input"
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"
    DIT = "dit"
    CONTROLNET = "controlnet"
    VAE_ONLY = "vae-only"
    UNET_ONLY = "unet-only"
    TEXT_ENCODER_ONLY = "text-encoder-only"
    LORA = "lora"
    EMBEDDING = "embedding"
    FIDESR_WEIGHTS = "fidesr-weights"
    PISA_SR_WEIGHTS = "pisa-sr-weights"
    OSEDIFF_WEIGHTS = "osediff-weights"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value

    @property
    def is_base_model(self) -> bool:
        """A (part of a) diffusion base model: it belongs in the base-model input, whichever model it is."""
        return self in _BASE_MODEL_FAMILIES

    @property
    def is_restoration_weights(self) -> bool:
        """Weights trained on top of SD 2.1-base by FiDeSR or its family (PiSA-SR, OSEDiff)."""
        return self in (ModelFamily.FIDESR_WEIGHTS, ModelFamily.PISA_SR_WEIGHTS, ModelFamily.OSEDIFF_WEIGHTS)


_NOT_BASE = {"controlnet", "lora", "embedding", "fidesr-weights", "pisa-sr-weights", "osediff-weights", "unknown"}
_BASE_MODEL_FAMILIES = frozenset(family for family in ModelFamily if family.value not in _NOT_BASE)


@dataclass(frozen=True)
class ModelIdentity:
    """What a model file or folder looks like.

    ``is_sd2``: ``load_base_model`` accepts it (an SD 2.x text-to-image model with all parts).
    ``description``: a phrase for messages, e.g. "an SD 1.x checkpoint (text context 768)".
    ``evidence``: what the deciding rule found (key names, sizes), for messages.
    """

    family: ModelFamily
    container: Container
    is_sd2: bool
    notes: tuple[str, ...] = ()
    description: str = ""
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileNote:
    """A remark made when ``condition`` holds; ``text`` may use ``{evidence}``."""

    text: str
    condition: KeyCondition


@dataclass(frozen=True)
class FileRule:
    """One row: files for which ``condition`` holds are ``family``; ``description`` may use ``{evidence}``."""

    family: ModelFamily
    description: str
    condition: KeyCondition
    usable: bool = False  # load_base_model accepts it
    notes: tuple[FileNote, ...] = ()

    def identity(self, checkpoint: OpenedCheckpoint) -> ModelIdentity | None:
        evidence = self.condition.evidence(checkpoint)
        if evidence is None:
            return None
        notes = []
        for note in self.notes:
            found = note.condition.evidence(checkpoint)
            if found is not None:
                notes.append(note.text.format(evidence=", ".join(found)))
        description = self.description.format(evidence=", ".join(evidence))
        return ModelIdentity(self.family, checkpoint.container, self.usable, tuple(notes), description, evidence)


# --------------------------------------------------------------------------- the conditions the table uses

_TRAINING_HINT = "give it as the FiDeSR weights (fidesr_weights input, --weights), not as the base model"
_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", ".lora.", "lora_mid", "hada_w1", "lokr_w1")
_CONV_IN = re.escape(UNET_PREFIX + "input_blocks.0.0.weight")
_CROSS_ATTENTION_KEY = re.escape(UNET_PREFIX) + r".*attn2\.to_k\.weight"  # [inner, text context]

LDM_UNET = AllOf(
    HasKey(UNET_PREFIX + "input_blocks.0.0.weight", reason=""),
    Not(HasKeyContaining("control_model.", *_LORA_MARKERS)),
)
TEXT_CONTEXT = KeyShape(_CROSS_ATTENTION_KEY, axis=1, reason="text context {value}")
SD1_EVIDENCE = AnyOf(
    KeyShape(_CROSS_ATTENTION_KEY, axis=1, one_of=(768,), reason="text context 768"),
    KeyRank(re.escape(UNET_PREFIX) + r".*\.proj_in\.weight", ndim=4, reason="conv proj_in"),
    HasKeyContaining("cond_stage_model.transformer.", reason="CLIP ViT-L text encoder cond_stage_model.transformer"),
)
SDXL_EVIDENCE = AnyOf(
    HasKeyContaining("conditioner.embedders.", reason="conditioner.embedders"),
    AllOf(
        HasKeyStartingWith(UNET_PREFIX + "label_emb.", reason="label_emb"),
        KeyShape(_CROSS_ATTENTION_KEY, axis=1, one_of=(1280, 2048), reason="text context {value}"),
    ),
)
MISSING_PARTS = AnyOf(
    Not(HasKeyStartingWith(VAE_PREFIX), reason="VAE (first_stage_model.*)"),
    Not(
        HasKeyStartingWith(OPEN_CLIP_PREFIX + "transformer.resblocks."),
        reason="text encoder (cond_stage_model.model.*)",
    ),
)
# The U-Net's input channels name the SD variant; the text-to-image model takes 4.
CHANNEL_VARIANTS = {9: "inpainting", 5: "depth", 7: "x4-upscaler", 8: "instruct-pix2pix"}
_NOT_4_CHANNELS = "; the text-to-image model takes 4"

SD2_NOTES = (
    FileNote("missing: {evidence}", MISSING_PARTS),
    FileNote(
        "{evidence} differs from SD 2.1-base (1024): not the released model's sizes",
        KeyShape(_CROSS_ATTENTION_KEY, axis=1, not_one_of=(1024,), reason="text context {value}"),
    ),
    FileNote(
        "the file also holds EMA weights (model_ema.*); the model.diffusion_model.* weights are used",
        KeyCount("model_ema.", more_than=100),
    ),
    FileNote(
        "the file name or metadata suggests the SD 2.x 768-v model (v-prediction, 768 px), which its weights "
        "cannot be told apart from; FiDeSR was trained on 2.1-base (epsilon, 512 px) and gives wrong results "
        "with 768-v weights",
        AnyOf(
            FileNameContains("768"),
            MetadataContains("modelspec.architecture", "768"),
            MetadataIs("modelspec.prediction_type", "v"),
        ),
    ),
)


def _input_variant_rules() -> tuple[FileRule, ...]:
    """SD 1.x / 2.x models whose U-Net does not take the 4 latent channels of text-to-image (SD 1.x first)."""
    rules = []
    for base, version, evidence in (("sd1", "SD 1.x", (SD1_EVIDENCE,)), ("sd2", "SD 2.x", ())):
        for channels, variant in CHANNEL_VARIANTS.items():
            in_channels = KeyShape(_CONV_IN, axis=1, one_of=(channels,), reason="conv_in takes {value} input channels")
            rules.append(
                FileRule(
                    ModelFamily(f"{base}-{variant}"),
                    f"an {version} {variant} checkpoint ({{evidence}}{_NOT_4_CHANNELS})",
                    AllOf(LDM_UNET, in_channels, *evidence),
                )
            )
        other = KeyShape(
            _CONV_IN, axis=1, not_one_of=(4, *CHANNEL_VARIANTS), reason="conv_in takes {value} input channels"
        )
        rules.append(
            FileRule(
                ModelFamily(f"{base}-other-input"),
                f"an {version} checkpoint of another input ({{evidence}}{_NOT_4_CHANNELS})",
                AllOf(LDM_UNET, other, *evidence),
            )
        )
    return tuple(rules)


# --------------------------------------------------------------------------- the table

FILE_RULES: tuple[FileRule, ...] = (
    # Training outputs on SD 2.1-base (docs/algorithm.md §6): pickled dicts with lists, ranks and state dicts.
    FileRule(
        ModelFamily.FIDESR_WEIGHTS,
        f"FiDeSR weights (LoRA + LRRB): {_TRAINING_HINT}",
        AnyOf(
            TopLevelKey("lrrb_state_dict"),
            HasKeyContaining("lrrb"),
            MetadataIs("fidesr.format", "fidesr-weights"),
        ),
    ),
    FileRule(
        ModelFamily.PISA_SR_WEIGHTS,
        "PiSA-SR weights (pixel/semantic LoRA: {evidence}), not a base model",
        AnyOf(
            TopLevelKeyEndingWith("_pix", "_sem"),
            HasKeyMatching(r"\.default_\w+_(pix|sem)\."),
            MetadataIs("fidesr.format", "pisa-sr-weights"),  # this package's .safetensors say their family
        ),
    ),
    FileRule(
        ModelFamily.OSEDIFF_WEIGHTS,
        "OSEDiff weights (U-Net and VAE LoRA: {evidence}), not a base model",
        AnyOf(
            TopLevelKey("rank_vae", "state_dict_vae", "vae_lora_encoder_modules", "rank_unet"),
            MetadataIs("fidesr.format", "osediff-weights"),
        ),
    ),
    FileRule(
        ModelFamily.FIDESR_WEIGHTS,
        f"FiDeSR LoRA weights: {_TRAINING_HINT}",
        AnyOf(
            TopLevelKey("state_dict_unet"),
            HasKeyContaining(".default_encoder.", ".default_decoder.", ".default_others."),
        ),
    ),
    # Original (LDM) layout checkpoints: model.diffusion_model.input_blocks...
    FileRule(ModelFamily.SDXL, "an SDXL checkpoint ({evidence})", AllOf(LDM_UNET, SDXL_EVIDENCE)),
    *_input_variant_rules(),
    FileRule(ModelFamily.SD1, "an SD 1.x checkpoint ({evidence})", AllOf(LDM_UNET, SD1_EVIDENCE)),
    FileRule(
        ModelFamily.SD2_UNCLIP,
        "an SD 2.x unCLIP checkpoint (image-embedding label_emb)",
        AllOf(LDM_UNET, HasKeyStartingWith(UNET_PREFIX + "label_emb.")),
    ),
    FileRule(
        ModelFamily.SD2,
        "an incomplete SD 2.x checkpoint (no {evidence})",
        AllOf(LDM_UNET, MISSING_PARTS),
        notes=SD2_NOTES,
    ),
    FileRule(
        ModelFamily.SD2,
        "an SD 2.x text-to-image checkpoint ({evidence})",
        AllOf(LDM_UNET, TEXT_CONTEXT),
        usable=True,
        notes=SD2_NOTES,
    ),
    FileRule(
        ModelFamily.UNKNOWN, "an original-layout U-Net without cross-attention, not SD 2.x text-to-image", LDM_UNET
    ),
    # Everything else.
    FileRule(
        ModelFamily.EMBEDDING,
        "a textual-inversion embedding, not a model",
        AnyOf(TopLevelKey("string_to_param", "emb_params"), HasKey("string_to_param", "emb_params")),
    ),
    FileRule(
        ModelFamily.LORA, "a LoRA / LyCORIS file (low-rank deltas), not a full model", HasKeyContaining(*_LORA_MARKERS)
    ),
    FileRule(
        ModelFamily.CONTROLNET,
        "a ControlNet, not a base model",
        HasKeyContaining("control_model.", "input_hint_block", "controlnet_cond_embedding"),
    ),
    FileRule(
        ModelFamily.SD3,
        "a Stable Diffusion 3 (MMDiT) checkpoint, a transformer rather than a U-Net",
        AnyOf(
            HasKeyContaining("joint_blocks."),
            AllOf(HasKeyContaining("context_embedder."), HasKeyContaining("transformer_blocks.")),
        ),
    ),
    FileRule(
        ModelFamily.FLUX,
        "a Flux checkpoint (double_blocks/single_blocks), a transformer rather than a U-Net",
        HasKeyContaining("double_blocks.", "single_blocks.", "single_transformer_blocks."),
    ),
    FileRule(
        ModelFamily.DIT,
        "a diffusion-transformer (DiT) checkpoint, not an SD 2.x U-Net",
        HasKeyContaining(UNET_PREFIX, "x_embedder.", "t_embedder.", "adaln_single."),
    ),
    FileRule(
        ModelFamily.VAE_ONLY,
        "a VAE-only file (encoder/decoder weights, no U-Net or text encoder)",
        AllOf(HasKeyContaining("encoder.conv_in.weight"), HasKeyContaining("decoder.conv_out.weight")),
    ),
    FileRule(
        ModelFamily.UNET_ONLY,
        "a lone diffusers U-Net weights file: load the whole diffusers folder instead",
        AllOf(HasKey("conv_in.weight"), HasKeyContaining("time_embedding.")),
    ),
    FileRule(
        ModelFamily.TEXT_ENCODER_ONLY,
        "a text-encoder-only file",
        HasKeyContaining("encoder.layers.", "transformer.resblocks.", "text_model."),
    ),
    FileRule(ModelFamily.UNKNOWN, "a file without tensors", NoTensors()),
)


def match_file_rules(checkpoint: OpenedCheckpoint) -> ModelIdentity:
    """The identity the first matching row of ``FILE_RULES`` gives ``checkpoint`` (UNKNOWN when none does)."""
    for rule in FILE_RULES:
        identity = rule.identity(checkpoint)
        if identity is not None:
            return identity
    examples = ", ".join(sorted(checkpoint.shapes)[:3])
    description = f"no Stable Diffusion checkpoint we recognise (keys such as {examples})"
    return ModelIdentity(ModelFamily.UNKNOWN, checkpoint.container, False, (), description)
