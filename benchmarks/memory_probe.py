"""Peak host memory of this process on Linux: reset the high-water mark, read it back later."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["reset_peak_rss", "peak_rss_bytes", "rss_bytes"]


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Set the peak RSS (VmHWM) to the current RSS, so it measures what comes next (Linux only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    return _status_bytes("VmRSS") or 0
