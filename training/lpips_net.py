"""Spatial VGG LPIPS for the FiDeSR losses and the DAW error map (docs/algorithm.md §5).

Wraps ``lpips.LPIPS(net="vgg", spatial=True)``: for two images in ``[-1, 1]``
it returns a per-pixel distance map ``[B, 1, H, W]`` at the input size.

Two sets of weights are involved.  The five calibrated linear heads ship inside
the ``lpips`` pip package and are always loaded from there (offline, with
``weights_only=True``).  The VGG-16 trunk does not: ``pretrained=True`` lets
torchvision fetch its ImageNet weights (cached under ``TORCH_HOME``), or
``trunk_weights`` names a local torchvision ``vgg16`` state-dict file.  With
``pretrained=False`` the trunk is random and nothing is fetched, which is what
tests use.

The network is frozen and stays in eval mode even when a parent module is put in
training mode (its heads contain dropout), but gradients still flow to the
inputs, so the map can be used as a loss.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch
from torch import nn

from fidesr_core.errors import ModelFileError

__all__ = ["LPIPSNet", "lpips_linear_weights_path"]


def lpips_linear_weights_path(version: str = "0.1") -> Path:
    """The VGG linear-head file shipped inside the ``lpips`` package."""
    return Path(lpips.__file__).resolve().parent / "weights" / f"v{version}" / "vgg.pth"


def _load_state(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise ModelFileError(f"{what} file {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable, truncated or not a tensor dict
        raise ModelFileError(f"{what} file {file} could not be read as a state dict: {error}") from error
    if not isinstance(state, dict):
        raise ModelFileError(f"{what} file {file} holds a {type(state).__name__}, expected a state dict")
    return state


class LPIPSNet(nn.Module):
    """Frozen spatial VGG LPIPS: ``forward(x, y) -> [B, 1, H, W]`` for ``x, y`` in ``[-1, 1]``.

    Args:
        pretrained: load the ImageNet VGG-16 trunk through torchvision (may download
            on first use).  ``False`` keeps a random trunk and never touches the network.
        trunk_weights: a local torchvision ``vgg16`` state dict (``features.N.weight`` ...)
            to use instead of downloading; implies no download whatever ``pretrained`` says.
    """

    def __init__(self, pretrained: bool = True, *, trunk_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        fetch_trunk = pretrained and trunk_weights is None
        # lpips' own ``pretrained`` flag only concerns the linear heads; load those ourselves
        # with weights_only=True instead of its plain torch.load.
        with warnings.catch_warnings():
            # lpips still passes torchvision's deprecated ``pretrained=`` argument
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.net = lpips.LPIPS(
                pretrained=False, net="vgg", version="0.1", spatial=True, pnet_rand=not fetch_trunk, verbose=False
            )
        self._load_linear_heads()
        if trunk_weights is not None:
            self._load_trunk(trunk_weights)
        self.net.requires_grad_(False)
        self.net.eval()

    def _load_linear_heads(self) -> None:
        path = lpips_linear_weights_path()
        state = _load_state(path, "LPIPS linear-head")
        # lin0..lin4 (the same tensors also appear under the ModuleList alias lins.N)
        expected = {name for name in self.net.state_dict() if name.startswith("lin") and not name.startswith("lins.")}
        if set(state) != expected:
            raise ModelFileError(f"LPIPS linear-head file {path} has keys {sorted(state)}, expected {sorted(expected)}")
        self.net.load_state_dict(state, strict=False)

    def _load_trunk(self, path: str | os.PathLike) -> None:
        state = _load_state(path, "VGG-16 trunk")
        # lpips keeps torchvision's layer indices: net.slice3.10.weight <- features.10.weight
        own = {name: tensor for name, tensor in self.net.state_dict().items() if name.startswith("net.slice")}
        mapped: dict[str, torch.Tensor] = {}
        for name, tensor in own.items():
            _, _, index, kind = name.split(".")
            source = f"features.{index}.{kind}"
            if source not in state:
                raise ModelFileError(
                    f"VGG-16 trunk file {path} lacks {source} (expected a torchvision vgg16 state dict)"
                )
            if tuple(state[source].shape) != tuple(tensor.shape):
                raise ModelFileError(
                    f"VGG-16 trunk file {path}: {source} has shape {tuple(state[source].shape)}, "
                    f"expected {tuple(tensor.shape)}"
                )
            mapped[name] = state[source]
        self.net.load_state_dict(mapped, strict=False)

    def train(self, mode: bool = True) -> LPIPSNet:
        """Ignore ``mode``: the frozen network always runs in eval mode (no dropout)."""
        super().train(False)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-pixel LPIPS between ``x`` and ``y`` (``[B, 3, H, W]`` in ``[-1, 1]``) -> ``[B, 1, H, W]``."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two [B, 3, H, W] images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        return self.net(x.float(), y.float())
