"""Kept KV caches of finished turns, so a conversation's next turn prefills only its new tokens.

An entry is the token ids a cache row held and a copy of that row's keys/values for them. The KV at
position ``t`` depends only on ids ``0..t``, so any common prefix of the cached ids and a new prompt
can be reused (exactly up to floating-point reduction order, see ``bot.model.engine``).
Entries are bounded in total bytes and evicted least recently used first.

Entries are keyed by a conversation (the bot's own requests), or, for requests without one (the
stateless OpenAI-compatible API, where every request resends the whole conversation), stored under an
anonymous key and found again by the longest common token prefix among the anonymous entries.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    ids: tuple[int, ...]
    kv: torch.Tensor  # [L, 2, G, len(ids), D], from kv_cache.read_kv

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size


# No conversation key starts with NUL, so anonymous keys never collide with a conversation's.
ANONYMOUS_KEY = "\x00prefix:"


class PrefixCache:
    """LRU map conversation key -> ``CachedPrefix`` holding at most ``max_bytes`` of KV in total."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._bytes = 0
        self._anonymous = itertools.count()

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

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def discard(self, key: str, entry: CachedPrefix) -> None:
        """Drop ``key`` if it still holds ``entry`` (a longer entry superseded it)."""
        if self._entries.get(key) is entry:
            self.take(key)

    def new_anonymous_key(self) -> str:
        return f"{ANONYMOUS_KEY}{next(self._anonymous)}"

    def longest_match(self, ids: Sequence[int]) -> tuple[str, CachedPrefix] | None:
        """The anonymous entry sharing the most leading ids with ``ids`` (at least one), left in the
        cache for other requests and marked most recently used. A linear scan: entries are few (their
        KV bounds them) and comparing ids is cheap next to prefilling them."""
        best: tuple[str, CachedPrefix] | None = None
        best_length = 0
        for key, entry in self._entries.items():
            if key.startswith(ANONYMOUS_KEY):
                length = common_prefix_length(entry.ids, ids)
                if length > best_length:
                    best, best_length = (key, entry), length
        if best is not None:
            self._entries.move_to_end(best[0])
        return best
