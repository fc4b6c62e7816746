"""The whole upscale, top to bottom (docs/algorithm.md §2):

    preprocess → encode → residual → (LRRB) refine → LF / HF injection → decode → colour fix

Each stage maps ``Latents`` to ``Latents``; ``upscale`` chains them and the ComfyUI nodes run them one per node,
so both give bit-identical results.  The model's recipe says what differs per family (§9).  Every stage runs
through ``runtime.run_stage`` and processes each image as it would be processed alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .networks.model import OneStepRestorer
from .ops.injection import high_frequency_delta, low_frequency_delta, spatial_gate
from .ops.preprocess import color_fix_decoded, prepare_lq, processing_size, resize_to_output
from .ops.restoration import predict_residual, refine_residual, restored_latent
from .ops.vae_codec import decode_latent, encode_image, vae_device
from .runtime import Runtime, run_stage, working_memory_bytes
from .settings import ColorFixMethod, HighFrequencySettings, LowFrequencySettings, UpscaleSettings

# Smallest tiles tried after running out of memory (the U-Net and VAE downsample by 8).
MIN_ENCODE_TILE = 128  # image pixels
MIN_LATENT_TILE = 16  # latent pixels
_LRRB_BYTES_PER_LATENT_PIXEL = 4096  # float32 dense-block features, about 200 channels with their copies
_INJECTION_BYTES_PER_PIXEL = 64  # image-sized detail maps and latent FFTs, float32


@dataclass(frozen=True, eq=False)
class Latents:
    """What the stages hand on (float32); each stage returns a new one.  The current latent is always recomputed
    from its parts in one fixed order (``latent``), so the two injections commute exactly."""

    z_lq: torch.Tensor  # [B, 4, h, w] the LQ latent z_L, scaled
    reference: torch.Tensor  # [B, 3, 8h, 8w] the upscaled LQ in [-1, 1]: colour-fix reference, gate source
    output_size: tuple[int, int]  # (height, width) of the final image
    gate: torch.Tensor | None = None  # [B, 1, h, w] the spatial gate M_sp, computed once
    residual: torch.Tensor | None = None  # r, or r̃ = r + Δr after the refine stage
    lf_delta: torch.Tensor | None = None  # what the LF injection added
    hf_delta: torch.Tensor | None = None  # what the HF injection added

    def restored(self) -> torch.Tensor:
        """``z = z_L − r̃`` (``z_L`` before the residual stage): what the injections start from."""
        return self.z_lq if self.residual is None else restored_latent(self.z_lq, self.residual)

    def latent(self) -> torch.Tensor:
        """The current scaled latent: ``z`` plus the LF delta, then the HF delta."""
        latent = self.restored().float()
        for delta in (self.lf_delta, self.hf_delta):
            if delta is not None:
                latent = latent + delta
        return latent

    def to(self, device: torch.device | str) -> Latents:
        """Every tensor on ``device`` (where the latents rest between stages)."""
        tensors = {item.name: getattr(self, item.name) for item in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)})


@torch.no_grad()
def upscale(
    model: OneStepRestorer,
    image: torch.Tensor,
    settings: UpscaleSettings | None = None,
    *,
    prompt_embedding: torch.Tensor | None = None,
    runtime: Runtime | None = None,
) -> torch.Tensor:
    """Super-resolve ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, round(s·H), round(s·W)]`` in [0, 1], float32 on CPU.

    ``prompt_embedding`` (``[1 or B, 77, dim]``) replaces the model's own.
    """
    settings = settings or UpscaleSettings()
    runtime = runtime or Runtime()
    injects = bool(settings.lf.strength or settings.hf.strength)
    latents = encode_stage(model, image, settings, runtime, with_gate=injects)
    latents = residual_stage(model, latents, settings, runtime, prompt_embedding=prompt_embedding)
    latents = refine_stage(model, latents, runtime)
    for branch in (settings.lf, settings.hf):
        if branch.strength:  # a strength of 0 adds exactly nothing: leaving the branch out only saves its work
            latents = injection_stage(latents, branch, runtime)
    return decode_stage(model, latents, settings, runtime).cpu()


def _tile_working_bytes(height: int, width: int, dtype: torch.dtype, image_pixels_per_unit: int = 64):
    """One image's working memory of a network over ``height × width`` units (default: latent pixels) by tile."""

    def working_bytes(tile: int) -> int:
        units = min(height, tile) * min(width, tile) if tile > 0 else height * width
        return working_memory_bytes(image_pixels_per_unit * units, dtype)

    return working_bytes


@torch.no_grad()
def encode_stage(
    model: OneStepRestorer,
    image: torch.Tensor,
    settings: UpscaleSettings,
    runtime: Runtime | None = None,
    *,
    with_gate: bool = True,
) -> Latents:
    """``[B, 3, H, W]`` in [0, 1] -> the latents of the upscaled image (§2.1, §2.3); ``with_gate``: also the
    injections' spatial gate, once for every later stage."""
    runtime = runtime or Runtime()
    _, (height, width) = processing_size(
        *image.shape[-2:], upscale_by=settings.upscale_by, process_size=settings.process_size
    )
    output_sizes: list[tuple[int, int]] = []

    def work(images: slice, tile: int, device: torch.device, progress) -> list[torch.Tensor | None]:
        prepared = prepare_lq(
            image[images].to(device), upscale_by=settings.upscale_by, process_size=settings.process_size
        )
        output_sizes.append(prepared.output_size)
        z_lq = encode_image(
            model,
            prepared.pixels,
            latent_mode=settings.latent_mode,
            seed=settings.seed,
            tile_size=tile,
            progress=progress,
            should_cancel=runtime.should_cancel,
            device=device,
            budget=settings.vae_budget(runtime.free_memory),
        )
        gate = spatial_gate(prepared.pixels, tuple(z_lq.shape[-2:])) if with_gate else None
        return [z_lq, prepared.pixels, gate]

    z_lq, reference, gate = run_stage(
        runtime,
        "encode",
        work,
        batch=image.shape[0],
        networks=("vae",),
        weights_device=vae_device(model),
        working_bytes=_tile_working_bytes(height, width, model.dtype, image_pixels_per_unit=1),
        tile=settings.encode_tile_size,
        min_tile=MIN_ENCODE_TILE,
        full_size=max(height, width),
    )
    return Latents(z_lq.float(), reference.float(), output_sizes[0], None if gate is None else gate.float())


def _overlap_for(tile: int, tile_size: int, tile_overlap: int) -> int:
    """Keep the overlap's share of the tile when a retry shrinks the tile."""
    if tile == tile_size:
        return tile_overlap
    if tile_size > 0:
        return tile_overlap * tile // tile_size
    return min(tile_overlap, tile // 3)


@torch.no_grad()
def residual_stage(
    model: OneStepRestorer,
    latents: Latents,
    settings: UpscaleSettings,
    runtime: Runtime | None = None,
    *,
    prompt_embedding: torch.Tensor | None = None,
) -> Latents:
    """The U-Net residual ``r`` of ``z_L`` (``z_L − x0`` for OSEDiff): the latent becomes ``z_L − r`` (§2.4, §9)."""
    runtime = runtime or Runtime()
    batch, _, height, width = latents.z_lq.shape

    def work(images: slice, tile: int, device: torch.device, progress) -> list[torch.Tensor]:
        embedding = prompt_embedding
        if embedding is not None and embedding.shape[0] == batch and batch > 1:
            embedding = embedding[images]
        residual = predict_residual(
            model,
            latents.z_lq[images],
            prompt_embedding=embedding,
            tile_size=tile,
            tile_overlap=_overlap_for(tile, settings.tile_size, settings.tile_overlap),
            pixel_strength=settings.pixel_strength,
            semantic_strength=settings.semantic_strength,
            progress=progress,
            should_cancel=runtime.should_cancel,
            device=device,
        )
        return [residual]

    (residual,) = run_stage(
        runtime,
        "residual",
        work,
        batch=batch,
        networks=("unet",),
        weights_device=model.device,
        working_bytes=_tile_working_bytes(height, width, model.dtype),
        tile=settings.tile_size,
        min_tile=MIN_LATENT_TILE,
        full_size=max(height, width),
        tile_unit="latent pixels",
    )
    return replace(latents, residual=residual.float().to(latents.z_lq.device))


@torch.no_grad()
def refine_stage(model: OneStepRestorer, latents: Latents, runtime: Runtime | None = None) -> Latents:
    """FiDeSR's LRRB: ``r̃ = r + Δr``, the latent becomes ``z_L − r̃`` (§2.5, §3).  Unchanged without an LRRB."""
    if model.lrrb is None:
        return latents
    if latents.residual is None:
        raise ValueError("the refine stage needs the residual stage's output")
    runtime = runtime or Runtime()
    batch, _, height, width = latents.z_lq.shape

    def work(images: slice, tile: int, device: torch.device, progress) -> list[torch.Tensor]:
        refined = refine_residual(model, latents.z_lq[images], latents.residual[images], device=device)
        if progress is not None:
            progress(1, 1)
        return [refined]

    (refined,) = run_stage(
        runtime,
        "refine",
        work,
        batch=batch,
        networks=("lrrb",),
        weights_device=next(model.lrrb.parameters()).device,
        working_bytes=lambda tile: height * width * _LRRB_BYTES_PER_LATENT_PIXEL,
    )
    return replace(latents, residual=refined.float().to(latents.z_lq.device))


@torch.no_grad()
def injection_stage(
    latents: Latents, branch: LowFrequencySettings | HighFrequencySettings, runtime: Runtime | None = None
) -> Latents:
    """Add the LF or HF delta (by the settings' type), computed from ``z`` and ``z_L``, never from an edited
    latent (§4); the same branch twice adds twice."""
    runtime = runtime or Runtime()
    low = isinstance(branch, LowFrequencySettings)
    delta_of = low_frequency_delta if low else high_frequency_delta
    batch, _, height, width = latents.z_lq.shape
    restored = latents.restored()

    def work(images: slice, tile: int, device: torch.device, progress) -> list[torch.Tensor | None]:
        z_lq = latents.z_lq[images].to(device)
        if latents.gate is not None:
            gate = latents.gate[images].to(device)
        else:  # latents from an encode stage that did not compute it
            gate = spatial_gate(latents.reference[images].to(device), (height, width))
        delta = delta_of(restored[images].to(device), z_lq, gate, branch)
        if progress is not None:
            progress(1, 1)
        return [delta, gate if latents.gate is None else None]

    delta, new_gate = run_stage(
        runtime,
        "lf" if low else "hf",
        work,
        batch=batch,
        networks=(),
        weights_device=latents.z_lq.device,
        working_bytes=lambda tile: 64 * height * width * _INJECTION_BYTES_PER_PIXEL,
    )
    device = latents.z_lq.device
    name = "lf_delta" if low else "hf_delta"
    total, delta = getattr(latents, name), delta.to(device).float()
    gate = latents.gate if new_gate is None else new_gate.float().to(device)
    return replace(latents, gate=gate, **{name: delta if total is None else total + delta})


def finish_image(
    decoded: torch.Tensor, reference: torch.Tensor, output_size: tuple[int, int], color_fix: ColorFixMethod
) -> torch.Tensor:
    """Colour-fix the decoded ``[B, 3, H, W]`` in [0, 1] against the upscaled LQ (float32, in [-1, 1]) at the
    processing size, then resize to the output size (§2.8, §2.9); 8-bit inputs as the released scripts do."""
    return resize_to_output(color_fix_decoded(decoded, reference, color_fix), output_size)


@torch.no_grad()
def decode_stage(
    model: OneStepRestorer,
    latents: Latents,
    settings: UpscaleSettings,
    runtime: Runtime | None = None,
    *,
    latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """The latent as an image ``[B, 3, H, W]`` in [0, 1], colour-fixed and at the output size (§2.8, §2.9);
    ``latent`` (scaled, ``[B, 4, h, w]``) replaces ``latents.latent()``: a latent edited in between."""
    runtime = runtime or Runtime()
    latent = latents.latent() if latent is None else latent
    batch, _, height, width = latent.shape

    def work(images: slice, tile: int, device: torch.device, progress) -> list[torch.Tensor]:
        decoded = decode_latent(
            model,
            latent[images],
            tile_size=tile,
            progress=progress,
            should_cancel=runtime.should_cancel,
            device=device,
            budget=settings.vae_budget(runtime.free_memory),
        )
        return [finish_image(decoded, latents.reference[images], latents.output_size, settings.color_fix)]

    (image,) = run_stage(
        runtime,
        "decode",
        work,
        batch=batch,
        networks=("vae",),
        weights_device=vae_device(model),
        working_bytes=_tile_working_bytes(height, width, model.dtype),
        tile=settings.decode_tile_size,
        min_tile=MIN_LATENT_TILE,
        full_size=max(height, width),
        tile_unit="latent pixels",
    )
    return image
