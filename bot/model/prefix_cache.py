"""Kept KV caches of finished turns, so a conversation's next turn prefills only its new tokens.

An entry is the token ids a cache row held and a copy of that row's keys/values for them. The KV at
position ``t`` depends only on ids ``0..t``, so any common prefix of the cached ids and a new prompt
can be reused (exactly up to floating-point reduction order, see ``bot.model.chat``).
Entries are bounded in total bytes and evicted least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    ids: tuple[int, ...]
    kv: torch.Tensor  # [L, 2, G, len(ids), D], from ChatGLM2.read_kv

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size


class PrefixCache:
    """LRU map conversation key -> ``CachedPrefix`` holding at most ``max_bytes`` of KV in total."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str) -> CachedPrefix | None:
        """Remove and return ``key``'s entry: the running turn owns it (its row gets a copy), and
        ``put`` stores the longer one when the turn ends."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
        return entry

    def put(self, key: str, entry: CachedPrefix) -> None:
        """Store ``entry`` as the most recent, evicting the least recently used ones over the limit.
        An entry larger than the whole limit is not kept (and drops any older one for ``key``)."""
        self.take(key)
        if not key or entry.nbytes > self.max_bytes:
            return
        while self._bytes + entry.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
