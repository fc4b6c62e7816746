"""Writing a file so that it is either complete or absent (PNGs, weights, reports); top level, not in ``app/``,
because the weights writer in ``loading/`` needs it too."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

_TEMP_EXTRA = len(".") + len(".") + 12 + len(".part")  # what the temporary name adds to the target's


def _fitting_prefix(path: Path) -> str:
    """The target's name, cut so the temporary name stays within the folder's name limit (255 bytes)."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf (Windows)
        limit = 255
    encoded = path.name.encode("utf-8", "surrogateescape")
    if len(encoded) + _TEMP_EXTRA <= limit:
        return path.name
    return encoded[: max(1, limit - _TEMP_EXTRA)].decode("utf-8", "ignore")


def _create_temp_file(path: Path) -> tuple[Path, int]:
    """A new empty ``.<name>.<random>.part`` beside ``path`` and the mode files normally get here: created 0o666
    so the kernel applies the umask (``mkstemp`` makes 0600), read back instead of calling process-wide ``os.umask``."""
    stem = _fitting_prefix(path)
    for _ in range(100):
        temp = path.parent / f".{stem}.{secrets.token_hex(6)}.part"
        try:
            handle = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        mode = os.fstat(handle).st_mode & 0o777
        os.close(handle)
        return temp, mode
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` then move the finished file to ``path``; never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp, mode = _create_temp_file(path)
    try:
        write(str(temp))
        os.chmod(temp, mode)  # writers that replace the file (safetensors does) leave it 0600
        os.replace(temp, path)
    except BaseException:  # including KeyboardInterrupt: no half files
        temp.unlink(missing_ok=True)
        raise
