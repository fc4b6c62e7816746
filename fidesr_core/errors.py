"""Exceptions raised by the engine.

Every message is written for the person who chose the file or value: it names
the thing that is wrong and what was expected, so the CLI can print it as one
line and ComfyUI can show it on the node.
"""

from __future__ import annotations

__all__ = [
    "FiDeSRError",
    "ModelFileError",
    "BaseModelError",
    "WeightsFileError",
    "ImageInputError",
    "SettingsError",
    "StepOrderError",
    "Cancelled",
]


class FiDeSRError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelFileError(FiDeSRError):
    """A model file is missing, unreadable, truncated or of the wrong kind."""


class BaseModelError(ModelFileError):
    """The base model is not Stable Diffusion 2.x (or cannot be read)."""


class WeightsFileError(ModelFileError):
    """A FiDeSR weights file is not in a format we read, or is damaged."""


class ImageInputError(FiDeSRError):
    """An input image cannot be read or is not usable."""


class SettingsError(FiDeSRError, ValueError):
    """A setting is out of range or of the wrong kind."""


class StepOrderError(FiDeSRError):
    """A step was asked to run on a latent it cannot take: wrong order, or a latent changed in between."""


class Cancelled(FiDeSRError):
    """The caller asked to stop (between tiles)."""
