"""Progress reporting and cancellation between units of work (tiles)."""

from __future__ import annotations

from collections.abc import Callable

from .errors import Cancelled

# Called as ``progress(done, total)`` after each unit of work (a tile); it may raise to stop.
ProgressCallback = Callable[[int, int], None]
# Called as ``progress(stage, done, total)``; stages are named in ``runtime.STAGES``.
StageProgress = Callable[[str, int, int], None]
# Returns True when the caller wants the computation to stop.
CancelCheck = Callable[[], bool]


def check_cancelled(should_cancel: CancelCheck | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled("stopped by the user")
