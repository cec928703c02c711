"""A fault the fake platforms inject into the bot's calls: the part fake_slack and fake_discord share
(which calls it matches, and how an answer is sent, are each fake's own)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

AnswerT = TypeVar("AnswerT")


class Held:
    """``InjectedFault.strike``'s answer for a held call: cut off with a 503, nothing carried out."""


HELD = Held()


@dataclass(kw_only=True)
class InjectedFault(Generic[AnswerT]):
    """In order: wait ``delay_s``; if ``hold`` is given, wait until it is set (at most ``hold_s``)
    and answer 503 without doing anything (what a connection cut mid-call looks like); else answer
    the next of ``answers`` (the call is not carried out), or, with ``probability`` < 1, fail only
    that share of calls with a random one of ``answers`` (kept). ``times`` limits how many matching
    calls it applies to; ``seen`` counts them."""

    delay_s: float = 0.0
    hold: asyncio.Event | None = None
    hold_s: float = 60.0
    answers: list[AnswerT] = field(default_factory=list)
    probability: float = 1.0
    times: int | None = None
    rng: random.Random = field(default_factory=random.Random)
    seen: int = 0
    active: bool = True

    def open(self) -> bool:
        """Whether it still applies to calls it matches."""
        return self.active and (self.times is None or self.seen < self.times)

    async def strike(self, notify: Callable[[], Awaitable[None]]) -> AnswerT | Held | None:
        """Apply it to one matching call: HELD, the answer to send instead, or None (carry it out)."""
        self.seen += 1
        await notify()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hold is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hold.wait(), self.hold_s)
            return HELD
        if self.answers and self.probability >= 1:
            return self.answers.pop(0)
        if self.answers and self.rng.random() < self.probability:
            return self.rng.choice(self.answers)
        return None
