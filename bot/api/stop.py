"""Stop sequences over streamed text: cut at the first one, never stream a part of one."""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """``push`` each delta and send what it returns; ``finish`` returns the rest. The pieces
    concatenate to the text up to (not including) the first stop sequence, or all of it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._text = ""
        self._sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self._text += delta
        start = max(0, self._sent - self._longest + 1)  # a stop could begin only in the unsent tail
        hits = [index for stop in self._stops if (index := self._text.find(stop, start)) >= 0]
        if hits:
            self.stopped = True
            self._text = self._text[: min(hits)]
            return self._release(len(self._text))
        return self._release(len(self._text) - self._held())

    def finish(self) -> str:
        return self._release(len(self._text))

    def _held(self) -> int:
        """Length of the longest tail that a stop sequence begins with."""
        for size in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

    def _release(self, end: int) -> str:
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
