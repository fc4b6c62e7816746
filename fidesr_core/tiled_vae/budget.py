"""The memory budget of the tiled VAE: the one setting callers of ``codec`` may pass besides the tile size."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SettingsError

_MIB = 1 << 20
MAP_MEMORY_MB = 512  # whole-image maps in RAM: 4096² output needs ~2 GB beyond the weights with it


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory the tiled VAE may hold (bytes), beyond the weights and its input and output.

    ``tile_bytes``: the largest activation of one tile; segments on wide, high-resolution maps use
    smaller tiles to stay under it (a segment's working set is a few such activations).
    ``map_bytes``: whole-image maps kept in host memory; the rest wait in temporary files in
    ``spill_folder`` (the system's temporary folder when ``None``).
    ``stock_bytes``: the untiled diffusers path is taken only while its largest activation fits.
    """

    tile_bytes: int = 64 * _MIB
    map_bytes: int = MAP_MEMORY_MB * _MIB
    stock_bytes: int = 256 * _MIB
    spill_folder: str | None = None

    def __post_init__(self) -> None:
        for name in ("tile_bytes", "map_bytes", "stock_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"tiled VAE memory budget: {name} must be an integer >= 0 bytes, got {value!r}")
