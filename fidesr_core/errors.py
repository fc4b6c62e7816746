"""Exceptions raised by the engine.  Every message names what is wrong and what was expected, for the person
who chose the file or value: the CLI prints it as one line, ComfyUI shows it on the node.
"""

from __future__ import annotations


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
    """A setting is out of range or of the wrong kind; ``setting`` names the field when it is one of the settings'."""

    def __init__(self, problem: str, *, setting: str | None = None) -> None:
        super().__init__(f"{setting} {problem}" if setting else problem)
        self.setting, self.problem = setting, problem  # e.g. "tile_size", "must be ..., got ..."


class OutOfMemory(FiDeSRError):
    """A stage ran out of memory even with one image at a time and its smallest tile."""


class Cancelled(FiDeSRError):
    """The caller asked to stop (between tiles)."""
