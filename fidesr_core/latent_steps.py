"""The steps of an upscale on a ``LatentState``: encode, U-Net residual, LRRB refine, LF/HF injection, decode.

    encode_step -> residual_step -> refine_step -> injection_step (LF, HF) -> decode_step

The same steps serve FiDeSR, PiSA-SR and OSEDiff: the model's recipe says what
differs per family (docs/algorithm.md §9), the state carries it, and the
refine step passes a latent through unchanged when the recipe has no LRRB.
``pipeline.upscale`` strings the steps together; the ComfyUI nodes call the
same steps one per node, so both give bit-identical results.  Each step checks
that it may run on the state it gets (``LatentState.check_next``), runs
through a ``StepRunner`` (which picks the device, the images per chunk and the
tile, and may retry after running out of memory) and processes a batch in
chunks, each image as it would be processed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .errors import SettingsError
from .latent_state import DECODE, ENCODE, HIGH_FREQUENCY, LOW_FREQUENCY, REFINE, RESIDUAL, STEP_NAMES, LatentState
from .networks.model import OneStepRestorer
from .ops.color_fix import COLOR_FIX_METHODS, ColorFixMethod
from .ops.injection import HighFrequencySettings, LowFrequencySettings, high_frequency_delta, low_frequency_delta
from .ops.injection import spatial_gate as compute_spatial_gate
from .ops.preprocess import PROCESS_SIZE, color_fix_decoded, prepare_lq, processing_size, resize_to_output
from .ops.restoration import predict_residual, refine_residual
from .ops.vae_codec import LatentMode, decode_latent, encode_image, vae_device
from .progress import CancelCheck, ProgressCallback
from .step_runner import Attempt, StepCall, StepRunner, run_in_chunks, working_memory_bytes
from .tiled_vae.budget import MemoryBudget

__all__ = [
    "MIN_ENCODE_TILE",
    "MIN_LATENT_TILE",
    "finish_image",
    "encode_step",
    "residual_step",
    "refine_step",
    "injection_step",
    "decode_step",
]

# Smallest tiles tried after running out of memory (the U-Net and VAE downsample by 8).
MIN_ENCODE_TILE = 128  # image pixels
MIN_LATENT_TILE = 16  # latent pixels
_LRRB_BYTES_PER_LATENT_PIXEL = 4096  # float32 dense-block features, about 200 channels with their copies
_INJECTION_BYTES_PER_PIXEL = 64  # image-sized detail maps and latent FFTs, float32


def _tile_pixels(height: int, width: int, tile: int) -> int:
    return min(height, tile) * min(width, tile) if tile > 0 else height * width


def _latent_tiled_call(
    step: str, network: str, weights_device: torch.device, latent: torch.Tensor, tile_size: int, model: OneStepRestorer
) -> StepCall:
    """A step that runs ``network`` on ``latent`` ``[B, 4, h, w]`` in tiles of latent pixels (the U-Net, the decoder)."""
    batch, _, height, width = latent.shape
    return StepCall(
        step=step,
        networks=(network,),
        weights_device=weights_device,
        batch_size=batch,
        # a latent pixel is 8x8 image pixels, hence 64 pixels' working memory per latent pixel
        working_bytes=lambda tile: working_memory_bytes(64 * _tile_pixels(height, width, tile), model.dtype),
        tile_size=tile_size,
        tiled=True,
        full_size=max(height, width),
        min_tile=MIN_LATENT_TILE,
        tile_unit="latent pixels",
    )


def _overlap_for(tile: int, tile_size: int, tile_overlap: int) -> int:
    """Keep the overlap's share of the tile when a runner shrinks the tile."""
    if tile == tile_size:
        return tile_overlap
    if tile_size > 0:
        return tile_overlap * tile // tile_size
    return min(tile_overlap, tile // 3)


ChunkFunction = Callable[[Attempt, slice, ProgressCallback | None], Sequence[torch.Tensor | None]]


def _run_step(
    runner: StepRunner, call: StepCall, run_chunk: ChunkFunction, progress: ProgressCallback | None = None
) -> list[torch.Tensor | None]:
    """``run_chunk`` over the batch in the chunks the runner chooses (and again if it retries)."""

    def work(attempt: Attempt) -> list[torch.Tensor | None]:
        return run_in_chunks(
            call.batch_size,
            attempt.images_per_chunk,
            lambda part, chunk_progress: run_chunk(attempt, part, chunk_progress),
            rest=runner.rest,
            progress=progress,
        )

    return runner.run(call, work)


def finish_image(
    decoded: torch.Tensor, upscaled_lq: torch.Tensor, output_size: tuple[int, int], color_fix: ColorFixMethod
) -> torch.Tensor:
    """Colour-fix the decoded ``[B, 3, H, W]`` in [0, 1] against the upscaled LQ (in [-1, 1]), then resize.

    Images prepared from 8-bit inputs get the released scripts' 8-bit steps (``color_fix_decoded``).
    """
    return resize_to_output(color_fix_decoded(decoded, upscaled_lq, color_fix), output_size)


@torch.no_grad()
def encode_step(
    model: OneStepRestorer,
    image: torch.Tensor,
    *,
    upscale_by: float = 4.0,
    latent_mode: LatentMode = "sample",
    seed: int = 0,
    tile_size: int = 1024,
    process_size: int = PROCESS_SIZE,
    with_gate: bool = True,
    vae_budget: MemoryBudget | None = None,
    runner: StepRunner | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> LatentState:
    """``[B, 3, H, W]`` in [0, 1] -> the state after the encode step, carrying the model's recipe.

    The image is upscaled on the device the VAE runs on; ``with_gate`` also
    computes the injections' spatial gate there, once for every later step.
    """
    runner = runner or StepRunner()
    batch, _, height, width = image.shape
    _, (proc_h, proc_w) = processing_size(height, width, upscale_by=upscale_by, process_size=process_size)
    call = StepCall(
        step=ENCODE,
        networks=("vae",),
        weights_device=vae_device(model),
        batch_size=batch,
        working_bytes=lambda tile: working_memory_bytes(_tile_pixels(proc_h, proc_w, tile), model.dtype),
        tile_size=tile_size,
        tiled=True,
        full_size=max(proc_h, proc_w),
        min_tile=MIN_ENCODE_TILE,
    )
    output_sizes: list[tuple[int, int]] = []

    def encode_chunk(attempt: Attempt, part: slice, chunk_progress: ProgressCallback | None) -> list:
        prepared = prepare_lq(image[part].to(attempt.device), upscale_by=upscale_by, process_size=process_size)
        output_sizes.append(prepared.output_size)
        z_lq = encode_image(
            model,
            prepared.pixels,
            latent_mode=latent_mode,
            seed=seed,
            tile_size=attempt.tile_size,
            progress=chunk_progress,
            should_cancel=should_cancel,
            device=attempt.device,
            budget=vae_budget,
        )
        gate = compute_spatial_gate(prepared.pixels, tuple(z_lq.shape[-2:])) if with_gate else None
        return [z_lq, prepared.pixels, gate]

    z_lq, pixels, gate = _run_step(runner, call, encode_chunk, progress)
    return LatentState.encoded(model.recipe, z_lq, pixels, output_sizes[0], model.scaling_factor, gate)


@torch.no_grad()
def residual_step(
    model: OneStepRestorer,
    state: LatentState,
    *,
    prompt_embedding: torch.Tensor | None = None,
    tile_size: int = 96,
    tile_overlap: int = 32,
    pixel_strength: float | None = None,
    semantic_strength: float | None = None,
    runner: StepRunner | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    names: Mapping[str, str] = STEP_NAMES,
) -> LatentState:
    """The U-Net residual ``r`` of ``z_L`` (``z_L − x0`` for OSEDiff); the latent becomes ``z_L − r``.

    ``pixel_strength`` / ``semantic_strength``: PiSA-SR's adjustable mode (see ``predict_residual``).
    """
    state.check_next(RESIDUAL, names)
    state.check_model(model.recipe, names[RESIDUAL])
    if tile_size > 0 and not 0 <= tile_overlap < tile_size:
        raise SettingsError(f"tile_overlap {tile_overlap} must be smaller than tile_size {tile_size}")
    runner = runner or StepRunner()
    batch = state.z_lq.shape[0]
    call = _latent_tiled_call(RESIDUAL, "unet", next(model.unet.parameters()).device, state.z_lq, tile_size, model)

    def residual_chunk(attempt: Attempt, part: slice, chunk_progress: ProgressCallback | None) -> list:
        embedding = prompt_embedding
        if embedding is not None and embedding.shape[0] == batch and batch > 1:
            embedding = embedding[part]
        residual = predict_residual(
            model,
            state.z_lq[part],
            prompt_embedding=embedding,
            tile_size=attempt.tile_size,
            tile_overlap=_overlap_for(attempt.tile_size, tile_size, tile_overlap),
            pixel_strength=pixel_strength,
            semantic_strength=semantic_strength,
            progress=chunk_progress,
            should_cancel=should_cancel,
            device=attempt.device,
        )
        return [residual]

    (residual,) = _run_step(runner, call, residual_chunk, progress)
    return state.with_residual(residual)


@torch.no_grad()
def refine_step(
    model: OneStepRestorer,
    state: LatentState,
    *,
    runner: StepRunner | None = None,
    names: Mapping[str, str] = STEP_NAMES,
) -> LatentState:
    """The LRRB's ``r̃ = r + Δr``; the latent becomes ``z_L − r̃``.  Unchanged when the recipe has no LRRB."""
    state.check_next(REFINE, names)
    state.check_model(model.recipe, names[REFINE])
    if not state.recipe.uses_lrrb:
        return state
    runner = runner or StepRunner()
    batch, _, height, width = state.z_lq.shape
    call = StepCall(
        step=REFINE,
        networks=("lrrb",),
        weights_device=next(model.lrrb.parameters()).device,
        batch_size=batch,
        working_bytes=lambda tile: height * width * _LRRB_BYTES_PER_LATENT_PIXEL,
    )

    def refine_chunk(attempt: Attempt, part: slice, _progress: ProgressCallback | None) -> list:
        return [refine_residual(model, state.z_lq[part], state.residual[part], device=attempt.device)]

    (refined,) = _run_step(runner, call, refine_chunk)
    return state.with_refined_residual(refined)


@torch.no_grad()
def injection_step(
    state: LatentState,
    settings: LowFrequencySettings | HighFrequencySettings,
    *,
    runner: StepRunner | None = None,
    names: Mapping[str, str] = STEP_NAMES,
) -> LatentState:
    """Add the LF or HF delta (by the settings' type), computed from the state, never from an edited latent."""
    branch = LOW_FREQUENCY if isinstance(settings, LowFrequencySettings) else HIGH_FREQUENCY
    state.check_next(branch, names)
    runner = runner or StepRunner()
    batch, _, height, width = state.z_lq.shape
    call = StepCall(
        step=branch,
        networks=(),
        weights_device=state.z_lq.device,
        batch_size=batch,
        working_bytes=lambda tile: 64 * height * width * _INJECTION_BYTES_PER_PIXEL,
    )
    delta_of = low_frequency_delta if branch == LOW_FREQUENCY else high_frequency_delta

    def injection_chunk(attempt: Attempt, part: slice, _progress: ProgressCallback | None) -> list:
        device = attempt.device
        z_lq = state.z_lq[part].to(device)
        if state.gate is not None:
            gate = state.gate[part].to(device)
        else:  # a state from an encode step that did not compute it
            gate = compute_spatial_gate(state.upscaled_lq[part].to(device), (height, width))
        z = state.restored()[part].to(device)
        return [delta_of(z, z_lq, gate, settings), gate if state.gate is None else None]

    delta, new_gate = _run_step(runner, call, injection_chunk)
    if new_gate is not None:
        state = state.with_gate(new_gate)
    return state.with_injection(branch, delta)


@torch.no_grad()
def decode_step(
    model: OneStepRestorer,
    state: LatentState,
    *,
    color_fix: ColorFixMethod = "adain",
    tile_size: int = 224,
    vae_budget: MemoryBudget | None = None,
    runner: StepRunner | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """The state's latent as an image ``[B, 3, H, W]`` in [0, 1], colour-fixed and at the output size."""
    if color_fix not in COLOR_FIX_METHODS:
        raise SettingsError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {color_fix!r}")
    runner = runner or StepRunner()
    latent = state.latent()
    call = _latent_tiled_call(DECODE, "vae", vae_device(model), latent, tile_size, model)

    def decode_chunk(attempt: Attempt, part: slice, chunk_progress: ProgressCallback | None) -> list:
        decoded = decode_latent(
            model,
            latent[part],
            tile_size=attempt.tile_size,
            progress=chunk_progress,
            should_cancel=should_cancel,
            device=attempt.device,
            budget=vae_budget,
        )
        return [finish_image(decoded, state.upscaled_lq[part], state.output_size, color_fix)]

    (image,) = _run_step(runner, call, decode_chunk, progress)
    return image
