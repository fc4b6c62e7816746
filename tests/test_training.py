"""End-to-end tests of the FiDeSR trainer on tiny random models (CPU, no downloads).

Runs of 1–20 optimisation steps on 32x32 crops of synthetic images check: every loss
term finite and only LoRA/LRRB tensors changing; determinism; exact resume (per-step
losses after resuming equal the uninterrupted run's); a clear loss drop on a tiny
problem; checkpoints in both formats loading in fidesr_core; the generator forward
against the formula of docs/algorithm.md §5; prompts, validation and the command line.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import write_training_workspace

from fidesr_core.errors import ModelFileError, SettingsError
from fidesr_core.networks.lrrb import LRRB
from fidesr_core.networks.tiny import tiny_base_model, tiny_fidesr_weights
from training.config import config_from_dict
from training.degradation import STAGE_SWITCHES

pytest.importorskip("accelerate")
pytest.importorskip("lpips")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch: pytest.MonkeyPatch):
    """One CPU thread (tiny tensors run far faster than with contended threads), no network, fresh accelerate state."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_training_workspace(tmp_path_factory.mktemp("training"))


def _config(workspace: dict[str, Path], output: Path, **sections) -> object:
    """A tiny full-loss run: L2 + LPIPS (random VGG) + CSD, DAW on from step 1, full degradation."""
    values = {
        "output_dir": str(output),
        "seed": 1,
        "model": {"base": "tiny", "tokenizer": str(workspace["tokenizer"]), "lora_rank": 4},
        "data": {"hq_folders": [str(workspace["hq"])], "crop_size": 32, "num_workers": 0},
        "loss": {"lpips_pretrained": False, "daw_start": 1, "daw_ramp": 2},
        "optim": {"batch_size": 2, "max_steps": 3, "mixed_precision": "no", "learning_rate": 1e-3},
        "checkpoint": {"every": 1000, "keep_last": 0},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for section, updates in sections.items():
        if isinstance(updates, dict):
            values.setdefault(section, {}).update(updates)
        else:
            values[section] = updates
    return config_from_dict(values)


_LPIPS: list = []


def _train(config, **kwargs):
    """``training.train.train`` with one shared random-trunk LPIPS network (building VGG takes seconds)."""
    from training.lpips_net import LPIPSNet
    from training.train import train

    if not _LPIPS:
        _LPIPS.append(LPIPSNet(pretrained=False))
    return train(config, lpips_net=_LPIPS[0], **kwargs)


def _totals(result) -> list[float]:
    return [entry["loss/total"] for entry in result.history]


# ---------------------------------------------------------------------------------------------- end to end


def test_steps_run_with_finite_terms_and_only_trainable_tensors_change(workspace, tmp_path: Path, caplog) -> None:
    base = tiny_base_model(0)
    reference = tiny_base_model(0)
    with caplog.at_level(logging.INFO, logger="training.train"):
        result = _train(_config(workspace, tmp_path / "run", logging={"every": 2}), base_model=base)
    assert result.step == 3 and len(result.history) == 3
    # without a progress bar each logged step (every 2nd, and the last) is a log line with its terms and time
    step_lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in step_lines] == ["step 2/3", "step 3/3"]
    assert all(entry["time/step_seconds"] > 0 for entry in result.history)
    for entry in result.history:
        for name in ("loss/total", "loss/l2", "loss/lpips", "loss/csd", "grad_norm"):
            assert np.isfinite(entry[name]), (name, entry)
        assert entry["loss/l2"] > 0 and entry["loss/lpips"] > 0 and entry["loss/csd"] != 0
        expected = entry["loss/l2"] + 2 * entry["loss/lpips"] + entry["loss/csd"]
        assert entry["loss/total"] == pytest.approx(expected, rel=1e-5)
    # alpha at optimiser step s (0-based, as released): 0.6 · clamp((s − 1) / 2, 0, 1)
    assert [entry["daw/alpha"] for entry in result.history] == pytest.approx([0.0, 0.0, 0.3])
    assert result.history[2]["daw/weight_max"] > 1.0 > result.history[2]["daw/weight_min"]

    generator = result.generator
    frozen = dict(reference.unet.named_parameters())
    lora_changed = 0
    for name, parameter in generator.unet.named_parameters():
        if "lora" in name:
            lora_changed += int(parameter.requires_grad)
            if "lora_B" in name:  # gaussian init starts B at zero; training must move every B
                assert parameter.abs().max() > 0, name
        else:
            assert not parameter.requires_grad
            assert torch.equal(parameter, frozen[name.replace(".base_layer", "")]), name
    assert lora_changed == sum(1 for n, _ in generator.unet.named_parameters() if "lora" in n) > 0
    fresh_lrrb = LRRB()
    assert all(
        not torch.equal(p, fresh_lrrb.state_dict()[n])
        for n, p in generator.lrrb.state_dict().items()
        if "conv5" in n or "out_conv" in n
    )
    for name, parameter in generator.vae.state_dict().items():
        assert torch.equal(parameter, reference.vae.state_dict()[name]), name
    for name, parameter in base.text_encoder.state_dict().items():
        assert torch.equal(parameter, reference.text_encoder.state_dict()[name]), name


def test_same_seed_same_losses(workspace, tmp_path: Path) -> None:
    first = _totals(_train(_config(workspace, tmp_path / "a", optim={"max_steps": 2})))
    second = _totals(_train(_config(workspace, tmp_path / "b", optim={"max_steps": 2})))
    other = _totals(_train(_config(workspace, tmp_path / "c", seed=2, optim={"max_steps": 1})))
    assert first == second
    assert first[0] != other[0]


def test_resumed_run_continues_with_the_same_losses(workspace, tmp_path: Path) -> None:
    settings = {"optim": {"max_steps": 4, "gradient_accumulation": 2}, "checkpoint": {"every": 2, "keep_last": 0}}
    uninterrupted = _train(_config(workspace, tmp_path / "full", **settings))
    assert [p.name for p in uninterrupted.checkpoints] == ["step-000002", "step-000004"]

    # a fresh process state resuming from an explicit checkpoint folder of the first run
    resumed = _train(_config(workspace, tmp_path / "resumed", resume=str(uninterrupted.checkpoints[0]), **settings))
    assert [entry["step"] for entry in resumed.history] == [3.0, 4.0]
    assert _totals(resumed) == pytest.approx(_totals(uninterrupted)[2:], abs=1e-6)
    for name in ("loss/l2", "loss/lpips", "loss/csd", "grad_norm"):
        assert [e[name] for e in resumed.history] == pytest.approx(
            [e[name] for e in uninterrupted.history[2:]], abs=1e-6
        )

    # interrupted after 3 steps (the last checkpoint is written at the stop), then `--resume latest`
    short = {"optim": {"max_steps": 3, "gradient_accumulation": 2}, "checkpoint": {"every": 2, "keep_last": 0}}
    _train(_config(workspace, tmp_path / "again", **short))
    latest = _train(_config(workspace, tmp_path / "again", resume="latest", **settings))
    assert [entry["step"] for entry in latest.history] == [4.0]
    assert _totals(latest) == pytest.approx(_totals(uninterrupted)[3:], abs=1e-6)
    final_state = uninterrupted.generator.trainable_state()
    for name, tensor in latest.generator.trainable_state().items():
        torch.testing.assert_close(tensor, final_state[name], atol=1e-6, rtol=0)


def test_fresh_run_refuses_a_folder_with_checkpoints(workspace, tmp_path: Path) -> None:
    _train(_config(workspace, tmp_path / "run", optim={"max_steps": 1}))
    with pytest.raises(SettingsError, match="--resume latest"):
        _train(_config(workspace, tmp_path / "run", optim={"max_steps": 2}))


def test_training_loss_falls_clearly(tmp_path: Path) -> None:
    """L2 only on one fixed 32x32 image, degradation off, z_L = mode: the loss must drop to < 0.7x."""
    folder = tmp_path / "hq"
    folder.mkdir()
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    image = np.stack([0.2 + 0.6 * xx, 0.8 - 0.6 * yy, 0.5 + 0 * xx], -1)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / "0.png")
    config = config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "seed": 1,
            "model": {"base": "tiny", "lora_rank": 4, "latent_sampling": "mode"},
            "data": {
                "hq_folders": [str(folder)],
                "crop_size": 32,
                "num_workers": 0,
                "flip": False,
                "caption_dropout": 1.0,
                "degradation": dict.fromkeys(STAGE_SWITCHES, False),
            },
            "loss": {"lpips_pretrained": False, "lambda_lpips": 0.0, "lambda_csd": 0.0},
            "optim": {"batch_size": 1, "max_steps": 20, "mixed_precision": "no", "learning_rate": 1e-2},
            "checkpoint": {"every": 1000},
            "logging": {"tensorboard": False, "progress_bar": False},
        }
    )
    losses = _totals(_train(config))
    assert len(losses) == 20 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, losses


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_layout_and_keep_last(workspace, tmp_path: Path) -> None:
    result = _train(
        _config(workspace, tmp_path / "run", optim={"max_steps": 4}, checkpoint={"every": 1, "keep_last": 2})
    )
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003", "step-000004"]
    latest = folder / "step-000004"
    assert (latest / "fidesr.pkl").is_file() and (latest / "fidesr.safetensors").is_file()
    state = json.loads((latest / "training_state" / "trainer_state.json").read_text())
    assert (state["step"], state["micro_step"]) == (4, 4)
    assert (latest / "training_state" / "trainable.safetensors").is_file()
    # the frozen networks are not saved: the training state is the size of the trainable tensors
    trainable_bytes = sum(t.numel() * 4 for t in result.generator.trainable_state().values())
    assert (latest / "training_state" / "trainable.safetensors").stat().st_size < 1.1 * trainable_bytes + 10_000
    assert not list(folder.glob("*.partial"))


def test_checkpoints_load_in_fidesr_core_in_both_formats(workspace, tmp_path: Path) -> None:
    from fidesr_core.loading.restorer import assemble_restorer
    from fidesr_core.loading.weights import load_restorer_weights
    from fidesr_core.pipeline import upscale
    from fidesr_core.settings import UpscaleSettings
    from training.validation import training_model_view

    result = _train(_config(workspace, tmp_path / "run", optim={"max_steps": 2}))
    folder = result.checkpoints[-1]
    raw = torch.load(folder / "fidesr.pkl", map_location="cpu", weights_only=True)
    # the authors' test script reads exactly these keys
    assert set(raw) == {
        "unet_lora_encoder_modules",
        "unet_lora_decoder_modules",
        "unet_lora_others_modules",
        "lora_rank_unet",
        "state_dict_unet",
        "lrrb_state_dict",
    }
    assert raw["lora_rank_unet"] == 4
    assert set(raw["state_dict_unet"]) == {k for k in result.generator.unet.state_dict() if "lora" in k}

    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    settings = UpscaleSettings(latent_mode="mode", color_fix="none")
    generator = result.generator.eval()
    expected = upscale(training_model_view(generator, _empty_embedding(), torch.float32), lq, settings)
    for name in ("fidesr.pkl", "fidesr.safetensors"):
        weights = load_restorer_weights(folder / name)
        assert weights.lora["unet"].rank == 4 and weights.lora["unet"].target_modules == generator.target_modules
        for key, tensor in generator.export_weights().lora["unet"].state.items():
            assert torch.equal(weights.lora["unet"].state[key].float(), tensor), key
        model = assemble_restorer(tiny_base_model(0), weights, precision="fp32", device="cpu")
        restored = upscale(model, lq, settings)
        torch.testing.assert_close(restored, expected, atol=2e-5, rtol=0)


def _empty_embedding() -> torch.Tensor:
    from fidesr_core.loading.restorer import prompt_embedding_for

    return prompt_embedding_for(tiny_base_model(0), "fidesr")


def test_fine_tuning_starts_from_the_given_weights(workspace, tmp_path: Path) -> None:
    from fidesr_core.loading.weights import save_restorer_weights

    released = tiny_fidesr_weights(tiny_base_model(0), rank=2, seed=5)
    path = tmp_path / "fidesr.pkl"
    save_restorer_weights(released, path)
    # max_steps 0: build and load only; the file's rank (2) wins over the config's (4)
    result = _train(_config(workspace, tmp_path / "run", model={"init_weights": str(path)}, optim={"max_steps": 0}))
    exported = result.generator.export_weights()
    assert exported.lora["unet"].rank == 2
    assert exported.lora["unet"].target_modules == released.lora["unet"].target_modules
    for key, tensor in released.lora["unet"].state.items():
        assert torch.equal(exported.lora["unet"].state[key], tensor), key
    for key, tensor in released.lrrb_state.items():
        assert torch.equal(exported.lrrb_state[key], tensor), key


# ---------------------------------------------------------------------------------------------- generator and prompts


def test_generator_forward_follows_the_formula() -> None:
    from fidesr_core.networks.model import SCALING_FACTOR
    from training.generator import PromptEncoder, build_generator

    base, reference = tiny_base_model(0), tiny_base_model(0)
    torch.manual_seed(0)
    generator = build_generator(base, lora_rank=4, latent_sampling="mode")
    with torch.no_grad():  # make LoRA and LRRB non-trivial
        for parameter in generator.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    embeds = PromptEncoder(base.text_encoder).cached("")
    lq = torch.rand(2, 3, 32, 32) * 2 - 1
    output = generator(lq, embeds)

    with torch.no_grad():
        z_lq = reference.vae.encode(lq).latent_dist.mode() * SCALING_FACTOR
        residual = generator.unet(z_lq, 1, encoder_hidden_states=embeds.expand(2, -1, -1)).sample
        z = z_lq - (residual + generator.lrrb(torch.cat([z_lq, residual], dim=1)))
        image = reference.vae.decode(z / SCALING_FACTOR).sample.clamp(-1, 1)
        teacher = reference.unet(z, 10, encoder_hidden_states=embeds.expand(2, -1, -1)).sample
    torch.testing.assert_close(output.lq_latent, z_lq)
    torch.testing.assert_close(output.latent, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.image, image, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(residual, reference.unet(z_lq, 1, encoder_hidden_states=embeds.expand(2, -1, -1)).sample)

    # gradient reaches LoRA and LRRB through the frozen decoder; z_L has none
    output.image.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.trainable_parameters()[:4])
    assert generator.lrrb.out_conv.weight.grad.abs().sum() > 0
    assert not output.lq_latent.requires_grad and all(p.grad is None for p in generator.vae.parameters())
    # the CSD teacher is the same U-Net with the adapters off, and they come back on afterwards
    with generator.frozen_predictor() as unet, torch.no_grad():
        torch.testing.assert_close(unet(z, 10, encoder_hidden_states=embeds.expand(2, -1, -1)).sample, teacher)
    assert all(p.requires_grad for p in generator.trainable_parameters())
    with torch.no_grad():
        assert not torch.allclose(generator.unet(z, 10, encoder_hidden_states=embeds.expand(2, -1, -1)).sample, teacher)


def test_prompts_need_a_tokenizer_only_when_not_empty(workspace) -> None:
    from training.generator import PromptEncoder, load_tokenizer

    empty = torch.tensor([[49406, 49407] + [0] * 75])  # BOS, EOS, then SD 2's padding "!" (id 0)

    text_encoder = tiny_base_model(0).text_encoder
    tokenizer = load_tokenizer(workspace["tokenizer"])
    plain, with_tokenizer = PromptEncoder(text_encoder), PromptEncoder(text_encoder, tokenizer)
    assert torch.equal(with_tokenizer.token_ids([""]), empty)
    assert torch.equal(tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids, empty)
    torch.testing.assert_close(plain.encode([""]), with_tokenizer.encode([""]))
    ids = with_tokenizer.token_ids(["a dog", ""])
    assert ids.shape == (2, 77) and ids.max() < 49408 and ids[0, 0] == 49406 and ids[0, 1] != 49407
    captions = with_tokenizer.encode(["a dog", "grass"])
    assert not torch.allclose(captions[0], captions[1])
    with pytest.raises(SettingsError, match="--tokenizer"):
        plain.encode(["a dog"])
    with pytest.raises(ModelFileError, match="vocab.json"):
        load_tokenizer(workspace["root"] / "hq")


def test_missing_tokenizer_fails_early(workspace, tmp_path: Path) -> None:
    config = _config(workspace, tmp_path / "run", model={"tokenizer": None})
    with pytest.raises(SettingsError, match="CSD needs the negative prompt.*--tokenizer"):
        _train(config)
    captions_only = _config(workspace, tmp_path / "run2", model={"tokenizer": None}, loss={"lambda_csd": 0.0})
    with pytest.raises(SettingsError, match="have captions"):
        _train(captions_only)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- options


def test_gradient_checkpointing_gives_the_same_losses(workspace, tmp_path: Path) -> None:
    plain = _totals(_train(_config(workspace, tmp_path / "a", optim={"max_steps": 2})))
    checkpointed = _totals(
        _train(_config(workspace, tmp_path / "b", optim={"max_steps": 2, "gradient_checkpointing": True}))
    )
    assert checkpointed == pytest.approx(plain, abs=1e-5)


def test_csd_teacher_can_be_another_model(workspace, tmp_path: Path) -> None:
    shared = _train(_config(workspace, tmp_path / "a", optim={"max_steps": 1}))
    other = _train(_config(workspace, tmp_path / "b", model={"csd_model": "tiny:1"}, optim={"max_steps": 1}))
    # same generator output (same seed, same init), different teacher: only the CSD term moves
    assert other.history[0]["loss/l2"] == pytest.approx(shared.history[0]["loss/l2"], abs=1e-7)
    assert abs(other.history[0]["loss/csd"] - shared.history[0]["loss/csd"]) > 1e-4


def test_bf16_mixed_precision_step(workspace, tmp_path: Path) -> None:
    result = _train(_config(workspace, tmp_path / "run", optim={"max_steps": 1, "mixed_precision": "bf16"}))
    generator = result.generator
    assert generator.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in generator.trainable_parameters())
    assert all(np.isfinite(v) for v in result.history[0].values())


def test_validation_saves_images_and_scores_hq_pairs(workspace, tmp_path: Path) -> None:
    lq_dir, hq_dir = tmp_path / "lq", tmp_path / "hq"
    lq_dir.mkdir()
    hq_dir.mkdir()
    rng = np.random.default_rng(1)
    for name in ("x", "y"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(lq_dir / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(hq_dir / "x.png")
    config = _config(
        workspace,
        tmp_path / "run",
        optim={"max_steps": 2},
        validation={"lq_folder": str(lq_dir), "hq_folder": str(hq_dir), "every": 2},
    )
    result = _train(config)
    out = tmp_path / "run" / "validation" / "step-000002"
    assert sorted(p.name for p in out.glob("*.png")) == ["x.png", "y.png"]
    with Image.open(out / "x.png") as image:
        assert image.size == (64, 64)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 1 and 0 < metrics["psnr"] < 60 and metrics["lpips"] > 0
    assert result.validations == [metrics]


def test_command_line(workspace, tmp_path: Path) -> None:
    from training.train import main

    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model:\n  base: tiny\n  lora_rank: 4\n"
        f"data:\n  hq_folders: ['{workspace['hq']}']\n  crop_size: 32\n  num_workers: 0\n"
        "loss:\n  lpips_pretrained: false\n"
        "logging:\n  tensorboard: false\n  progress_bar: false\n"
    )
    args = [
        "--config",
        str(config_file),
        "--output-dir",
        str(tmp_path / "run"),
        "--tokenizer",
        str(workspace["tokenizer"]),
        "--max-steps",
        "1",
        "--batch-size",
        "1",
        "--mixed-precision",
        "no",
        "checkpoint.formats=[safetensors]",
    ]
    assert main(args) == 0
    folder = tmp_path / "run" / "checkpoints" / "step-000001"
    assert (folder / "fidesr.safetensors").is_file() and not (folder / "fidesr.pkl").exists()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch_size: 1" in saved and "formats:\n  - safetensors" in saved
    assert main(args[:-1] + ["optim.learning_rat=1"]) == 2  # a typo is an error message, not a traceback
