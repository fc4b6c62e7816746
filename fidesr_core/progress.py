"""Progress reporting and cancellation between units of work (tiles)."""

from __future__ import annotations

from collections.abc import Callable

from .errors import Cancelled

__all__ = ["ProgressCallback", "StageProgressCallback", "CancelCheck", "check_cancelled"]

# Called as ``progress(done, total)`` after each unit of work; it may raise to stop.
ProgressCallback = Callable[[int, int], None]
# Returns True when the caller wants the computation to stop.
CancelCheck = Callable[[], bool]


def check_cancelled(should_cancel: CancelCheck | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled("stopped by the user")


# Called as ``stage_progress(stage, done, total)``; stages are named in ``pipeline.STAGES``.
StageProgressCallback = Callable[[str, int, int], None]
