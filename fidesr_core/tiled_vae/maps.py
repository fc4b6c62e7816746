"""Where the tiled VAE's whole-image maps wait between segments: on the computing device, in host memory or in
unlinked temporary files (read and written one box at a time with ``pread``/``pwrite``, never mapped), the
first of ``MemoryBudget.places`` with room; the result is the same wherever a map waits (docs/algorithm.md §2.10).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref

import torch

from ..errors import SettingsError
from .budget import PLACES, MemoryBudget
from .layers import Box

TILE_WORKING_SET = 8  # a tile's working memory in its largest activations (the inputs, a few layers, the outputs)


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
        self,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        folder: str | None,
        layout: torch.memory_format,
        traffic: dict[str, int],
    ) -> None:
        self.shape, self.dtype, self.layout, self.traffic = (
            shape,
            dtype,
            layout,
            traffic,
        )  # traffic: bytes read, written
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
        self.traffic["read"] += raw.nbytes
        if self.layout == torch.contiguous_format and device.type == "cpu":
            # [h·w, C] transposed per sample: copied in cache blocks, several times faster than a permuted 4-D copy
            tile = torch.empty((batch, channels, *rows.shape[1:3]), dtype=self.dtype)
            for sample in range(batch):
                tile[sample].view(channels, -1).copy_(rows[sample].view(-1, channels).t())
            return tile
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
        self.traffic["written"] += raw.nbytes


class MapStore:
    """Makes each whole-image map in the first of ``budget.places`` with room for it (``MemoryBudget.rooms``,
    asked once); ``peak``: the most maps held at once per place (the output excepted); ``traffic``: file bytes."""

    def __init__(
        self, budget: MemoryBudget, device: torch.device, layout: torch.memory_format = torch.contiguous_format
    ) -> None:
        self.budget, self.device, self.layout = budget, device, layout  # layout: the VAE's convolutions' format
        self.tile_bytes = budget.tile_limit(device)
        self.rooms = budget.rooms(device, TILE_WORKING_SET * self.tile_bytes)
        self.live, self.peak = dict.fromkeys(PLACES, 0), dict.fromkeys(PLACES, 0)
        self.traffic = {"read": 0, "written": 0}

    def new_map(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> WholeMap:
        nbytes = math.prod(shape) * dtype.itemsize
        place = next((p for p in self.budget.places if self.live[p] + nbytes <= self.rooms[p]), None)
        if place is None:
            raise MemoryError(
                f"tiled VAE: a {nbytes / 2**30:.2f} GiB whole-image map has no room in {', '.join(self.budget.places)}"
            )
        if place == "file":
            whole: WholeMap = FileMap(shape, dtype, self.budget.spill_folder, self.layout, self.traffic)
        else:
            device = self.device if place == "device" else torch.device("cpu")
            whole = TensorMap(torch.empty(shape, dtype=dtype, device=device, memory_format=self.layout), self.layout)
        self.live[place] += nbytes
        self.peak[place] = max(self.peak[place], self.live[place])
        weakref.finalize(whole, self._released, nbytes, place)
        return whole

    def output_map(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> WholeMap:
        """The result: a tensor on ``device``, outside the budget (it is what the caller asked for)."""
        return TensorMap(torch.empty(shape, dtype=dtype, device=device, memory_format=self.layout), self.layout)

    def _released(self, nbytes: int, place: str) -> None:
        self.live[place] -= nbytes
