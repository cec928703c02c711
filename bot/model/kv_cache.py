"""The fixed-size KV cache (written by position: slot == position) and the copy of one row's prefix in
and out of it, which prefix reuse (prefix_cache.py, engine.py) moves between requests."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Fixed-size cache ``[B, G, T, D]``; slot ``t`` holds the key/value of position ``t``."""

    def __init__(
        self, max_batch: int, max_seq_len: int, groups: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (max_batch, groups, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def update(
        self,
        input_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        first_row: int = 0,
        newest: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, G, S, D]`` at ``input_pos [B, S]`` into rows ``first_row ..``; return those
        B rows of the cache (views, no copy). ``newest``: the largest position, when the caller knows it
        (one row and one token then go by a plain slice copy instead of an indexed one)."""
        batch, _, seq, _ = k.shape
        rows_used = slice(first_row, first_row + batch)
        k_out, v_out = self.k_cache[rows_used], self.v_cache[rows_used]
        if batch == 1 and seq == 1 and newest is not None:
            k_out[:, :, newest : newest + 1].copy_(k)
            v_out[:, :, newest : newest + 1].copy_(v)
        elif batch == 1 or bool((input_pos == input_pos[:1]).all()):
            k_out.index_copy_(2, input_pos[0], k)
            v_out.index_copy_(2, input_pos[0], v)
        else:
            rows = torch.arange(batch, device=k.device)[:, None]  # [B, 1]
            k_out[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is [B, S, G, D]
            v_out[rows, :, input_pos] = v.transpose(1, 2)
        return k_out, v_out


def read_kv(caches: list[KVCache], row: int, length: int) -> torch.Tensor:
    """A copy of cache row ``row``'s first ``length`` slots: ``[L, 2 (k, v), G, length, D]``."""
    return torch.stack(
        [torch.stack((cache.k_cache[row, :, :length], cache.v_cache[row, :, :length])) for cache in caches]
    )


def write_kv(caches: list[KVCache], row: int, kv: torch.Tensor) -> None:
    """Copy ``kv [L, 2, G, T, D]`` (from ``read_kv``) into slots ``0 .. T-1`` of cache row ``row``."""
    length = kv.shape[3]
    for cache, layer in zip(caches, kv, strict=True):
        cache.k_cache[row, :, :length].copy_(layer[0])
        cache.v_cache[row, :, :length].copy_(layer[1])
