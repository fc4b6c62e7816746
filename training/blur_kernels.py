"""Blur kernels of the Real-ESRGAN degradation, sampled per image and built in batches.

Every kernel lives on a ``size x size`` grid (21 by default) centred on the middle pixel. A kernel of odd
size ``k < size`` is the same formula evaluated on the grid and zeroed outside the central ``k x k``
window, which equals building it at ``k x k`` and zero-padding it to ``size``. Kernels are normalised to
sum to 1 so that blurring keeps the mean brightness.

Families (``x`` is the pixel offset from the centre, ``Q = x^T Σ^-1 x`` with
``Σ = R(θ) diag(σx², σy²) R(θ)^T``):

- Gaussian: ``exp(-Q / 2)``
- generalized Gaussian: ``exp(-Q^β / 2)`` (β < 1 heavy tails, β > 1 flat top)
- plateau: ``1 / (1 + Q^β)``
- circular low-pass ("sinc"): the 2-D ideal low-pass with cutoff ``ωc`` (radians per pixel),
  ``ωc · J1(ωc·r) / (2π r)`` with the limit ``ωc² / (4π)`` at ``r = 0``.

Isotropic variants use ``σy = σx`` and ``θ = 0``; anisotropic ones draw ``σy`` independently and
``θ ~ U(-π, π)``.

Randomness goes through :class:`RandomStream`, which draws on the generator's own device (so a CPU
``torch.Generator`` also drives CUDA data) and moves the result to the data's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "KERNEL_TYPES",
    "RandomStream",
    "circular_lowpass_kernels",
    "gaussian_family_kernels",
    "identity_kernels",
    "kernel_grid",
    "normalize_kernels",
    "sample_blur_kernels",
    "sample_final_sinc_kernels",
    "window_mask",
]

# name -> (family, anisotropic); the names follow the Real-ESRGAN configuration files.
KERNEL_TYPES: dict[str, tuple[str, bool]] = {
    "iso": ("gaussian", False),
    "aniso": ("gaussian", True),
    "generalized_iso": ("generalized", False),
    "generalized_aniso": ("generalized", True),
    "plateau_iso": ("plateau", False),
    "plateau_aniso": ("plateau", True),
}


class RandomStream:
    """Seedable source of the per-sample random draws of the degradation.

    With ``generator=None`` the global torch RNG of ``device`` is used. With a generator, draws are made
    on ``generator.device`` and moved to ``device``; the same generator state therefore gives the same
    numbers whatever device the images are on.
    """

    def __init__(self, device: torch.device | str, generator: torch.Generator | None = None) -> None:
        self.device = torch.device(device)
        self.generator = generator
        self.draw_device = generator.device if generator is not None else self.device

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """``[n]`` float32 values from U[low, high)."""
        draw = torch.rand(n, generator=self.generator, device=self.draw_device)
        return (low + (high - low) * draw).to(self.device)

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal float32 values of ``shape``."""
        return torch.randn(tuple(shape), generator=self.generator, device=self.draw_device).to(self.device)

    def poisson(self, rate: torch.Tensor) -> torch.Tensor:
        """Poisson counts with the given (non-negative) rates, same shape and device as ``rate``."""
        counts = torch.poisson(rate.to(self.draw_device), generator=self.generator)
        return counts.to(rate.device)

    def categorical(self, probs: Sequence[float], n: int) -> torch.Tensor:
        """``[n]`` int64 indices drawn with the given probabilities (which sum to 1)."""
        edges = torch.tensor(probs, dtype=torch.float64).cumsum(0)[:-1].to(torch.float32).to(self.device)
        return torch.searchsorted(edges, self.uniform(n), right=True)

    def pick(self, probs: Sequence[float]) -> int:
        """One index drawn with the given probabilities, as a Python int (a host sync on CUDA)."""
        return int(self.categorical(probs, 1).item())

    def split_uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        """``[n]`` shape exponents: U[low, 1) or U[1, high) with probability 1/2 each.

        This keeps β < 1 and β > 1 equally likely even when the range is lopsided (e.g. [0.5, 4]).
        """
        below = self.uniform(n, min(low, 1.0), 1.0)
        above = self.uniform(n, 1.0, max(high, 1.0))
        return torch.where(self.uniform(n) < 0.5, below, above)


def kernel_grid(size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row offsets ``(x, y)`` from the centre, each ``[size, size]`` float32."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel grid size must be a positive odd number, got {size}")
    axis = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def window_mask(kernel_sizes: torch.Tensor, size: int) -> torch.Tensor:
    """``[n, size, size]`` masks, 1 inside each central ``k x k`` window (``kernel_sizes`` ``[n]``)."""
    x, y = kernel_grid(size, kernel_sizes.device)
    half = ((kernel_sizes.to(torch.float32) - 1) / 2).view(-1, 1, 1)
    return ((x.abs() <= half) & (y.abs() <= half)).to(torch.float32)


def normalize_kernels(kernels: torch.Tensor) -> torch.Tensor:
    """Scale each ``[..., k, k]`` kernel so that its entries sum to 1."""
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def identity_kernels(n: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n, size, size]`` unit pulses: convolving with them leaves an image unchanged."""
    kernels = torch.zeros(n, size, size, device=device)
    kernels[:, size // 2, size // 2] = 1.0
    return kernels


def gaussian_family_kernels(
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    beta: torch.Tensor,
    plateau: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Unnormalised ``[n, size, size]`` (generalized) Gaussian or plateau kernels; all inputs ``[n]``.

    ``beta = 1`` with ``plateau = False`` is the ordinary Gaussian.
    """
    x, y = kernel_grid(size, sigma_x.device)
    cos = torch.cos(theta).view(-1, 1, 1)
    sin = torch.sin(theta).view(-1, 1, 1)
    # Coordinates in the kernel's principal axes: R(θ)^T x.
    along = cos * x + sin * y  # [n, size, size]
    across = -sin * x + cos * y
    quadratic = (along / sigma_x.view(-1, 1, 1)) ** 2 + (across / sigma_y.view(-1, 1, 1)) ** 2
    powered = quadratic.pow(beta.view(-1, 1, 1))
    return torch.where(plateau.view(-1, 1, 1), 1.0 / (1.0 + powered), torch.exp(-0.5 * powered))


def circular_lowpass_kernels(cutoff: torch.Tensor, size: int) -> torch.Tensor:
    """Unnormalised ``[n, size, size]`` ideal circular low-pass kernels for cutoffs ``[n]`` (rad/pixel)."""
    x, y = kernel_grid(size, cutoff.device)
    radius = torch.sqrt(x**2 + y**2)  # [size, size]
    omega = cutoff.to(torch.float32).view(-1, 1, 1)
    safe_radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    jinc = omega * torch.special.bessel_j1(omega * safe_radius) / (2 * math.pi * safe_radius)
    centre = omega**2 / (4 * math.pi)  # limit of the expression at r = 0
    return torch.where(radius > 0, jinc, centre)


def _draw_sizes(kernel_sizes: Sequence[int], n: int, rng: RandomStream) -> torch.Tensor:
    """``[n]`` kernel sizes, each drawn uniformly from ``kernel_sizes``."""
    table = torch.tensor(list(kernel_sizes), device=rng.device)
    return table[rng.categorical([1 / len(table)] * len(table), n)]


def sample_blur_kernels(
    n: int,
    rng: RandomStream,
    *,
    kernel_sizes: Sequence[int],
    kernel_types: Sequence[str],
    type_probs: Sequence[float],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    sinc_prob: float,
    size: int = 21,
) -> torch.Tensor:
    """``[n, size, size]`` normalised blur kernels, each with its own randomly drawn type and parameters.

    Every parameter is drawn for every sample (and the unused ones discarded), so the random stream
    consumed does not depend on which types were picked.
    """
    device = rng.device
    sizes = _draw_sizes(kernel_sizes, n, rng)  # [n]
    chosen = rng.categorical(type_probs, n)  # [n] index into kernel_types
    families = [KERNEL_TYPES[name][0] for name in kernel_types]
    anisotropic_table = torch.tensor([KERNEL_TYPES[name][1] for name in kernel_types], device=device)
    generalized_table = torch.tensor([f == "generalized" for f in families], device=device)
    plateau_table = torch.tensor([f == "plateau" for f in families], device=device)
    anisotropic = anisotropic_table[chosen]
    generalized = generalized_table[chosen]
    plateau = plateau_table[chosen]

    sigma_x = rng.uniform(n, *sigma_range)
    sigma_y = torch.where(anisotropic, rng.uniform(n, *sigma_range), sigma_x)
    theta = torch.where(anisotropic, rng.uniform(n, -math.pi, math.pi), torch.zeros_like(sigma_x))
    beta_generalized = rng.split_uniform(n, *betag_range)
    beta_plateau = rng.split_uniform(n, *betap_range)
    beta = torch.where(generalized, beta_generalized, torch.where(plateau, beta_plateau, torch.ones_like(sigma_x)))
    kernels = gaussian_family_kernels(sigma_x, sigma_y, theta, beta, plateau, size)

    # Small sinc kernels get a higher minimum cutoff: a low cutoff would need a wide support.
    use_sinc = rng.uniform(n) < sinc_prob
    wide_cutoff = rng.uniform(n, math.pi / 5, math.pi)
    narrow_cutoff = rng.uniform(n, math.pi / 3, math.pi)
    cutoff = torch.where(sizes < 13, narrow_cutoff, wide_cutoff)
    kernels = torch.where(use_sinc.view(-1, 1, 1), circular_lowpass_kernels(cutoff, size), kernels)
    return normalize_kernels(kernels * window_mask(sizes, size))


def sample_final_sinc_kernels(
    n: int,
    rng: RandomStream,
    *,
    kernel_sizes: Sequence[int],
    prob: float,
    size: int = 21,
) -> torch.Tensor:
    """``[n, size, size]`` kernels: a circular low-pass (cutoff U[π/3, π]) with probability ``prob``, else a pulse."""
    device = rng.device
    sizes = _draw_sizes(kernel_sizes, n, rng)  # [n]
    cutoff = rng.uniform(n, math.pi / 3, math.pi)
    use_sinc = rng.uniform(n) < prob
    sinc = normalize_kernels(circular_lowpass_kernels(cutoff, size) * window_mask(sizes, size))
    return torch.where(use_sinc.view(-1, 1, 1), sinc, identity_kernels(n, size, device))
