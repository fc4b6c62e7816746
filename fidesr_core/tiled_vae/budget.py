"""The memory budget of the tiled VAE, and how much memory a device has free (docs/algorithm.md §2.10)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import SettingsError

if TYPE_CHECKING:
    import torch

_MIB = 1 << 20
PLACES = ("device", "host", "file")  # where a whole-image map can wait, in the default order of preference
# Free beside the maps: a decode held 0.9–1.1 GB beyond them at 2048² fp32 and 4096² bf16, and finishing
# a 4096² image takes ~0.4 GB more (benchmarks/README.md); an accelerator's headroom is not yet measured.
HOST_HEADROOM_MB, DEVICE_HEADROOM_MB = 2048, 1024
# A tile's largest activation on an accelerator: 1/AUTO_TILE_SHARE of its free memory, within these bounds.
# A CPU keeps the floor: 2048² fp32 decoded in 195.5 s with 671 MiB tiles and 189.7 s with 64 MiB (2-core
# Sapphire Rapids), and larger tiles only take room from the maps.
MIN_TILE_MB, MAX_TILE_MB, AUTO_TILE_SHARE = 64, 1024, 32


def _host_available() -> int | None:
    try:
        import psutil  # ComfyUI ships it; the CLI may not have it

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None: unknown); an accelerator's cached blocks count."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type == "cpu":
        return _host_available()
    return None


@dataclass(frozen=True)
class MemoryBudget:
    """Where the tiled VAE's whole-image maps wait, and how large its tiles are (bytes; None: automatic).

    A map goes to the first of ``places`` with room (``rooms``): ``"device"`` (within ``device_map_bytes``),
    ``"host"`` (within ``map_bytes``), ``"file"`` (in ``spill_folder``, default the system's temporary folder).
    ``tile_bytes``: one tile's largest activation.  ``stock_bytes``: the untiled diffusers path is taken only
    while its largest activation fits.
    """

    tile_bytes: int | None = None
    map_bytes: int | None = None
    device_map_bytes: int | None = None
    host_headroom: int = HOST_HEADROOM_MB * _MIB
    device_headroom: int = DEVICE_HEADROOM_MB * _MIB
    places: tuple[str, ...] = PLACES
    stock_bytes: int = 256 * _MIB
    spill_folder: str | None = None
    free_memory: Callable[[torch.device], int | None] = field(default=free_memory_bytes, compare=False)

    def __post_init__(self) -> None:
        for name in ("tile_bytes", "map_bytes", "device_map_bytes", "host_headroom", "device_headroom", "stock_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SettingsError(f"tiled VAE memory budget: {name} must be an integer >= 0 bytes, got {value!r}")
        if not self.places or len(set(self.places)) != len(self.places) or not set(self.places) <= set(PLACES):
            raise SettingsError(
                f"tiled VAE memory budget: places must be distinct names of {PLACES}, got {self.places}"
            )

    def tile_limit(self, device: torch.device) -> int:
        """``tile_bytes``, or automatic: the floor on a CPU, a share of an accelerator's free memory."""
        if self.tile_bytes is not None:
            return self.tile_bytes
        free = 0 if device.type == "cpu" else self.free_memory(device) or 0
        return min(MAX_TILE_MB * _MIB, max(MIN_TILE_MB * _MIB, free // AUTO_TILE_SHARE))

    def rooms(self, device: torch.device, working_bytes: int) -> dict[str, int]:
        """Bytes of maps each place may hold at once: free memory beyond the headroom and the tiles'
        ``working_bytes``, within the cap; asked once per run (maps made but not yet written take no pages)."""
        import torch

        # A CPU computes in host memory, and so does Apple's MPS (unified memory): maps "on the device" would
        # take the host's room a second time, so there they wait in the host's.
        on_host, host_free = device.type in ("cpu", "mps"), self.free_memory(torch.device("cpu"))
        # free memory unknown (an unusual platform): the room the fixed budget used to allow
        host = 512 * _MIB if host_free is None else host_free - self.host_headroom - working_bytes * on_host
        device_free = None if on_host else self.free_memory(device)
        accelerator = 0 if device_free is None else device_free - self.device_headroom - working_bytes
        return {
            "device": _within(accelerator, self.device_map_bytes),
            "host": _within(host, self.map_bytes),
            "file": 1 << 62,
        }


def _within(room: int, cap: int | None) -> int:
    return max(0, room if cap is None else min(room, cap))
