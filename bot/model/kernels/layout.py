"""The native kernel's int4 weight layout (documented in int4_native.cpp), built from the official
format (bot/model/int4.py) and read back.

Rows are padded to tiles of ``TILE_ROWS`` and columns to a multiple of ``BLOCK`` (the activation
values per int8 scale); padding is q = 0, scale = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bot.model import int4
from bot.model.kernels import build

BLOCK = 32  # activation values per int8 scale; in_features is padded to a multiple (kBlock in C++)
TILE_ROWS = 32  # output rows per packed tile (kTileRows in C++)


@dataclass(frozen=True, eq=False)
class PackedInt4:
    """Per-row-scaled int4 weights ([out, in], value q * scale, q in [-8, 7]) in the kernel's layout.

    ``packed`` holds u = q + 8 nibbles in tiles of 32 rows (layout documented in int4_native.cpp), with
    rows padded to a multiple of 32 and columns to a multiple of BLOCK (padding: q = 0, scale = 0).
    """

    packed: torch.Tensor  # uint8 [tiles * padded_in * 16]
    scale: torch.Tensor  # float32 [tiles * 32]
    out_features: int
    in_features: int

    @property
    def padded_in(self) -> int:
        return self.packed.numel() * 2 // self.scale.numel()

    @classmethod
    def from_official(cls, qweight: torch.Tensor, scale: torch.Tensor) -> PackedInt4:
        """From ChatGLM2-INT4's ``.weight`` (int8 [out, in/2], even column in the high nibble) and
        ``.weight_scale`` ([out])."""
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.numel() == 0:
            raise ValueError(f"qweight must be int8 [out, in/2], got {qweight.dtype} {tuple(qweight.shape)}")
        out, half = qweight.shape
        if not scale.is_floating_point() or scale.shape != (out,):
            raise ValueError(f"scale must be a float [{out}] tensor, got {scale.dtype} {tuple(scale.shape)}")
        module = build.kernel()
        qweight = qweight.contiguous()
        # The C++ repacking is ~10x faster; it also puts the weights on huge pages.
        packed = pack_python(qweight) if module is None else module.pack_official(qweight)
        padded_scale = torch.zeros(packed.numel() * 2 // _padded(2 * half, BLOCK), dtype=torch.float32)
        padded_scale[:out] = scale
        return cls(packed, padded_scale, out, 2 * half)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the weight as float32, exactly q * scale."""
        stop = self.out_features if stop is None else stop
        if not 0 <= start <= stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) out of [0, {self.out_features})")
        first, last = start // TILE_ROWS, -(-stop // TILE_ROWS)
        padded_in = self.padded_in
        tile_bytes = padded_in * TILE_ROWS // 2
        raw = self.packed[first * tile_bytes : last * tile_bytes].view(last - first, padded_in // 8, 2, 16, 4)
        u = torch.stack((raw & 15, raw >> 4), dim=-1).permute(0, 2, 3, 1, 5, 4)
        q = u.reshape((last - first) * TILE_ROWS, padded_in).float() - 8
        offset = first * TILE_ROWS
        rows = q[start - offset : stop - offset, : self.in_features]
        return rows * self.scale[start:stop, None]


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def pack_python(qweight: torch.Tensor) -> torch.Tensor:
    """The kernel's layout built with torch ops (int4_native.cpp's pack_official without a compiler)."""
    out, half = qweight.shape
    tiles, padded_in = _padded(out, TILE_ROWS) // TILE_ROWS, _padded(2 * half, BLOCK)
    tile_bytes = padded_in * TILE_ROWS // 2
    nibbles = qweight.view(torch.uint8)
    packed = torch.empty(tiles * tile_bytes, dtype=torch.uint8)
    for start in range(0, out, int4.CHUNK_ROWS):
        stop = min(start + int4.CHUNK_ROWS, out)
        chunk_tiles = _padded(stop - start, TILE_ROWS) // TILE_ROWS
        rows = nibbles[start:stop]
        u = torch.full((chunk_tiles * TILE_ROWS, padded_in), 8, dtype=torch.uint8)
        # q + 8 of a 4-bit two's complement value is the value with its top bit flipped.
        u[: stop - start, : 2 * half] = torch.stack(((rows >> 4) ^ 8, (rows & 15) ^ 8), dim=-1).flatten(1)
        # [tile, group, lane, k8, half, j] -> [tile, k8, group, lane, j, half]
        u = u.view(chunk_tiles, 2, 16, padded_in // 8, 2, 4).permute(0, 3, 1, 2, 5, 4)
        first = start // TILE_ROWS * tile_bytes
        packed[first : first + chunk_tiles * tile_bytes] = (u[..., 0] | (u[..., 1] << 4)).reshape(-1)
    return packed
