"""Errors the nodes raise: ComfyUI shows the message on the node, so each starts with the node's display name
and says what value was wrong and what was expected.  Engine errors (``FiDeSRError``) are re-raised so."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..fidesr_core.errors import FiDeSRError, ModelFileError


class FiDeSRNodeError(Exception):
    """An input a FiDeSR node cannot use, or an engine error, attributed to the node."""


# ComfyUI shows "<module>.<class>: <message>"; the pack's module name is its file path.
FiDeSRNodeError.__module__ = "fidesr"


def node_error(node: str, message: str) -> FiDeSRNodeError:
    """``FiDeSRNodeError("<node>: <message>")``, to be raised by the caller."""
    return FiDeSRNodeError(f"{node}: {message}")


@contextmanager
def engine_errors(node: str, *, sources: str | None = None) -> Iterator[None]:
    """Re-raise engine errors naming ``node``; ``sources`` (where the right files come from) ends model-file errors."""
    try:
        yield
    except FiDeSRError as error:
        message = str(error)
        if sources and isinstance(error, ModelFileError):
            message = f"{message.rstrip('.')}. Where the files come from: {sources}"
        raise node_error(node, message) from error
