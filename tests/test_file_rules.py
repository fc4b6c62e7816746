"""The one rule table for "what is this file" (``loading/file_rules.py``) and its key conditions.

The base-model loader and the FiDeSR weights reader both ask the table, so the same file is named the same
way by both; identities are typed (``ModelFamily``, ``Container``) and frozen. Files are built here on the
fly, the training outputs in the layouts the released trainers write (docs/algorithm.md §6).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import safetensors.torch
import torch
from weights_fixtures import authors_checkpoint

from fidesr_core.errors import BaseModelError, WeightsFileError
from fidesr_core.loading.base_model import load_base_model
from fidesr_core.loading.checkpoint_files import Container, OpenedCheckpoint
from fidesr_core.loading.file_rules import FILE_RULES, FileRule, ModelFamily, ModelIdentity, match_file_rules
from fidesr_core.loading.identify import identify_model_file
from fidesr_core.loading.key_conditions import (
    AllOf,
    AnyOf,
    HasKeyContaining,
    KeyShape,
    Not,
    TopLevelKey,
    TopLevelKeyEndingWith,
)
from fidesr_core.loading.weights import load_fidesr_weights

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def authors() -> dict:
    return authors_checkpoint()


def _opened(shapes: dict[str, tuple[int, ...]], top_keys: set[str] | None = None) -> OpenedCheckpoint:
    return OpenedCheckpoint(Path("in-memory.ckpt"), Container.PICKLE, shapes, top_keys=frozenset(top_keys or ()))


def _renamed_adapters(state: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    renames = {f".default_{part}.": f".default_{part}{suffix}." for part in ("encoder", "decoder", "others")}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def _training_output(case: str, authors: dict, path: Path) -> Path:
    """Files of the released trainers: PiSA-SR's and OSEDiff's ``save_model`` layouts, and FiDeSR's."""
    lists = {key: authors[key] for key in authors if key.endswith("_modules")}
    lora = authors["state_dict_unet"]
    if case == "pisa-sr":
        payload = {f"{key}_{kind}": value for kind in ("pix", "sem") for key, value in lists.items()}
        payload |= {"lora_rank_unet_pix": 4, "lora_rank_unet_sem": 4}
        payload["state_dict_unet"] = {**_renamed_adapters(lora, "_pix"), **_renamed_adapters(lora, "_sem")}
    elif case == "pisa-sr-lists-only":  # no rank key, only the pixel decoder adapter: the lists say PiSA-SR
        payload = {"unet_lora_decoder_modules_pix": lists["unet_lora_decoder_modules"]}
        payload["state_dict_unet"] = {k: v for k, v in _renamed_adapters(lora, "_pix").items() if "decoder" in k}
    elif case == "pisa-sr-safetensors":  # only the tensor names say it
        tensors = {k: v.contiguous() for k, v in _renamed_adapters(lora, "_pix").items()}
        safetensors.torch.save_file(tensors, str(path))
        return path
    elif case == "osediff":
        payload = {**lists, "rank_unet": 4, "rank_vae": 4, "vae_lora_encoder_modules": ["encoder.conv_in"]}
        payload |= {
            "state_dict_unet": lora,
            "state_dict_vae": {"encoder.conv_in.lora_A.default_encoder.weight": torch.zeros(4, 3, 3, 3)},
        }
    elif case == "osediff-unet-only":  # a U-Net-only OSEDiff file: rank_unet is the tell
        payload = {**lists, "rank_unet": 4, "state_dict_unet": lora}
    elif case == "fidesr-lora-only":
        payload = {key: authors[key] for key in authors if key != "lrrb_state_dict"}
    else:
        raise AssertionError(case)
    torch.save(payload, path)
    return path


TRAINING_OUTPUTS = {
    "pisa-sr": (ModelFamily.PISA_SR_WEIGHTS, "PiSA-SR"),
    "pisa-sr-lists-only": (ModelFamily.PISA_SR_WEIGHTS, "PiSA-SR"),
    "pisa-sr-safetensors": (ModelFamily.PISA_SR_WEIGHTS, "PiSA-SR"),
    "osediff": (ModelFamily.OSEDIFF_WEIGHTS, "OSEDiff"),
    "osediff-unet-only": (ModelFamily.OSEDIFF_WEIGHTS, "OSEDiff"),
    "fidesr-lora-only": (ModelFamily.FIDESR_WEIGHTS, "FiDeSR"),
}


@pytest.mark.parametrize("case", sorted(TRAINING_OUTPUTS))
def test_both_loaders_name_a_training_output_alike(case: str, authors: dict, tmp_path: Path) -> None:
    family, name = TRAINING_OUTPUTS[case]
    suffix = ".safetensors" if case.endswith("safetensors") else ".pkl"
    path = _training_output(case, authors, tmp_path / f"{case}{suffix}")
    identity = identify_model_file(path)
    assert identity.family is family and not identity.is_sd2
    with pytest.raises(BaseModelError) as as_base:
        load_base_model(path)
    assert name in str(as_base.value) and str(path) in str(as_base.value)
    with pytest.raises(WeightsFileError) as as_weights:
        load_fidesr_weights(path)
    message = str(as_weights.value)
    assert str(path) in message and name in message
    if family is not ModelFamily.FIDESR_WEIGHTS:
        assert "not FiDeSR weights" in message and "not supported by this loader" in message
        assert any(fragment in message for fragment in identity.evidence)  # says what gave it away


def test_identities_are_typed_and_frozen(authors: dict, tmp_path: Path) -> None:
    identity = identify_model_file(_training_output("osediff", authors, tmp_path / "o.pkl"))
    assert isinstance(identity, ModelIdentity)
    assert isinstance(identity.family, ModelFamily) and isinstance(identity.container, Container)
    assert identity.container is Container.PICKLE and str(identity.container) == "ckpt (pickle)"
    assert str(identity.family) == f"{identity.family}" == "osediff-weights"
    assert identity.evidence == ("rank_unet, rank_vae, state_dict_vae, ...",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.is_sd2 = True  # type: ignore[misc]


def test_every_row_names_a_family_and_the_base_model_families_are_the_diffusion_models() -> None:
    assert all(isinstance(rule, FileRule) and isinstance(rule.family, ModelFamily) for rule in FILE_RULES)
    assert [rule.family for rule in FILE_RULES if rule.usable] == [ModelFamily.SD2]
    base = {family for family in ModelFamily if family.is_base_model}
    assert {ModelFamily.SD1, ModelFamily.SD2, ModelFamily.SD2_768_V, ModelFamily.SDXL, ModelFamily.VAE_ONLY} <= base
    assert not base & {ModelFamily.LORA, ModelFamily.CONTROLNET, ModelFamily.UNKNOWN, ModelFamily.EMBEDDING}
    assert {family for family in ModelFamily if family.is_restoration_weights} == {
        ModelFamily.FIDESR_WEIGHTS,
        ModelFamily.PISA_SR_WEIGHTS,
        ModelFamily.OSEDIFF_WEIGHTS,
    }


def test_a_new_row_is_one_line_of_conditions() -> None:
    """The table is extended by rows like this one (in file_rules.FILE_RULES, before broader rows)."""
    rule = FileRule(
        ModelFamily.UNKNOWN,
        "a made-up model ({evidence})",
        AllOf(TopLevelKey("made_up_rank"), HasKeyContaining(".made_up_adapter.", reason="made-up adapters")),
    )
    file = _opened({"conv.made_up_adapter.weight": (4, 4)}, {"made_up_rank", "state_dict"})
    identity = rule.identity(file)
    assert identity is not None and identity.description == "a made-up model (made_up_rank, made-up adapters)"
    assert rule.identity(_opened({"conv.made_up_adapter.weight": (4, 4)})) is None


def test_key_conditions_say_why_they_hold() -> None:
    file = _opened({"a.attn2.to_k.weight": (320, 768), "b.proj_in.weight": (320, 320, 1, 1)}, {"x_pix", "y_sem", "z"})
    context = KeyShape(r".*attn2\.to_k\.weight", axis=1, reason="text context {value}")
    assert context.evidence(file) == ("text context 768",)
    assert KeyShape(r".*attn2\.to_k\.weight", axis=1, one_of=(1024,)).evidence(file) is None
    assert KeyShape(r".*attn2\.to_k\.weight", axis=1, not_one_of=(768,)).evidence(file) is None
    assert KeyShape(r".*missing", axis=0).evidence(file) is None
    assert TopLevelKeyEndingWith("_pix", "_sem").evidence(file) == ("x_pix, y_sem",)
    assert AnyOf(HasKeyContaining("nothing"), context).evidence(file) == ("text context 768",)
    assert AnyOf(HasKeyContaining("nothing"), TopLevelKey("w")).evidence(file) is None
    assert AllOf(context, TopLevelKey("nothing")).evidence(file) is None
    assert Not(TopLevelKey("nothing"), reason="no nothing").evidence(file) == ("no nothing",)
    assert Not(context).evidence(file) is None


def test_an_unrecognised_file_names_some_of_its_keys() -> None:
    identity = match_file_rules(_opened({"alpha": (1,), "beta": (2,), "gamma": (3,), "delta": (4,)}))
    assert identity.family is ModelFamily.UNKNOWN
    assert identity.description == "no Stable Diffusion checkpoint we recognise (keys such as alpha, beta, delta)"
    assert match_file_rules(_opened({})).description == "a file without tensors"
