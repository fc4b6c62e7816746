"""Where the tiled VAE's whole-image maps wait between segments: in memory up to a budget, then in files.

A segment reads each tile's region from the maps the previous segment left and writes the tile's
core into new ones, so a map is only ever touched one tile-sized box at a time. That lets a map live
in an unlinked temporary file once the maps in memory reach ``MemoryBudget.map_bytes``: the memory
held is then the budget plus one tile, whatever the image size, and the result is the same. Files
are read and written with ``pread``/``pwrite`` rather than mapped, so their pages never count as the
process's memory (docs/algorithm.md §2.10).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref

import torch

from ..errors import SettingsError
from .budget import MemoryBudget
from .layers import Box


class WholeMap:
    """A whole-image map ``[B, C, H, W]`` read and written one box at a time."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, box: Box, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def write(self, box: Box, piece: torch.Tensor) -> None:
        raise NotImplementedError


class TensorMap(WholeMap):
    """A map held as one tensor (in host memory, or on the device for the final output)."""

    def __init__(self, tensor: torch.Tensor, layout: torch.memory_format) -> None:
        self.tensor, self.shape, self.dtype, self.layout = tensor, tuple(tensor.shape), tensor.dtype, layout

    def read(self, box: Box, device: torch.device) -> torch.Tensor:
        # a dense copy, as from a file: some half-precision kernels round differently on strided views
        tile = self.tensor[..., box.top : box.bottom, box.left : box.right]
        return tile.to(device).contiguous(memory_format=self.layout)

    def write(self, box: Box, piece: torch.Tensor) -> None:
        self.tensor[..., box.top : box.bottom, box.left : box.right] = piece


class FileMap(WholeMap):
    """A map in an unlinked temporary file, laid out ``[B, H, W, C]`` so each row of a box is one run of bytes."""

    def __init__(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, folder: str | None, layout: torch.memory_format
    ) -> None:
        self.shape, self.dtype, self.layout = shape, dtype, layout
        try:
            self.file = tempfile.TemporaryFile(dir=folder)
            self.file.truncate(self.nbytes)  # sparse until written
        except OSError as error:
            where = folder or tempfile.gettempdir()
            raise SettingsError(
                f"tiled VAE: cannot make a {self.nbytes / 2**30:.1f} GiB temporary file for a whole-image map "
                f"in {where} ({error}); free disk space there, set TMPDIR, or raise the tiled VAE's map memory (vae_memory_mb, --vae-memory)"
            ) from error
        self.fd = self.file.fileno()

    def _row_offsets(self, box: Box):
        batch, channels, height, width = self.shape
        row_bytes = (box.right - box.left) * channels * self.dtype.itemsize
        for sample in range(batch):
            for row in range(box.top, box.bottom):
                offset = ((sample * height + row) * width + box.left) * channels * self.dtype.itemsize
                yield sample, row - box.top, offset, row_bytes

    def read(self, box: Box, device: torch.device) -> torch.Tensor:
        batch, channels = self.shape[:2]
        rows = torch.empty((batch, box.bottom - box.top, box.right - box.left, channels), dtype=self.dtype)
        raw = rows.view(torch.uint8).numpy()  # [B, h, w, C·itemsize]
        for sample, row, offset, size in self._row_offsets(box):
            if os.preadv(self.fd, [raw[sample, row]], offset) != size:
                raise OSError(f"tiled VAE: short read from a temporary map file at byte {offset}")
        tile = rows.permute(0, 3, 1, 2)  # [B, C, h, w], channels-last in memory
        return tile.to(device).contiguous(memory_format=self.layout)  # as a map in memory would give it

    def write(self, box: Box, piece: torch.Tensor) -> None:
        rows = piece.detach().to("cpu").permute(0, 2, 3, 1).contiguous()  # [B, h, w, C]
        raw = rows.view(torch.uint8).numpy()
        for sample, row, offset, size in self._row_offsets(box):
            try:
                written = os.pwritev(self.fd, [raw[sample, row]], offset)
            except OSError as error:
                raise SettingsError(
                    f"tiled VAE: writing a whole-image map to its temporary file failed ({error}); "
                    "free disk space in the temporary folder (TMPDIR) or raise the tiled VAE's map memory "
                    "(vae_memory_mb, --vae-memory)"
                ) from error
            if written != size:
                raise OSError(f"tiled VAE: short write to a temporary map file at byte {offset}")


class MapStore:
    """Makes whole-image maps in host memory while the live ones fit ``budget.map_bytes``, in files after that
    (on an accelerator too: it then holds only one tile's working set).

    ``peak_bytes`` is the most that maps in host memory held at once (the final output excepted);
    ``peak_file_bytes`` the same for files.
    """

    def __init__(self, budget: MemoryBudget, layout: torch.memory_format = torch.contiguous_format) -> None:
        self.budget, self.layout = budget, layout  # layout: the memory format of maps (the VAE's convolutions')
        self.live_bytes = self.peak_bytes = self.file_bytes = self.peak_file_bytes = 0

    def new_map(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> WholeMap:
        nbytes = math.prod(shape) * dtype.itemsize
        in_file = self.live_bytes + nbytes > self.budget.map_bytes
        if in_file:
            whole: WholeMap = FileMap(shape, dtype, self.budget.spill_folder, self.layout)
            self.file_bytes += nbytes
            self.peak_file_bytes = max(self.peak_file_bytes, self.file_bytes)
        else:
            whole = TensorMap(torch.empty(shape, dtype=dtype, memory_format=self.layout), self.layout)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(whole, self._released, nbytes, in_file)
        return whole

    def output_map(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> WholeMap:
        """The result: a tensor on ``device``, outside the budget (it is what the caller asked for)."""
        return TensorMap(torch.empty(shape, dtype=dtype, device=device, memory_format=self.layout), self.layout)

    def _released(self, nbytes: int, in_file: bool) -> None:
        if in_file:
            self.file_bytes -= nbytes
        else:
            self.live_bytes -= nbytes
