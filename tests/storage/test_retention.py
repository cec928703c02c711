"""History retention (BOT_HISTORY_RETENTION_DAYS): old turns go whole, newer ones stay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from bot.events import ChannelRef
from storage.repository import Storage

CHANNEL = ChannelRef("discord", "42")


async def _turn(storage: Storage, n: int) -> None:
    await storage.append_turn(
        CHANNEL,
        author_id="U1",
        author_name="Ada",
        user_text=f"q{n}",
        user_tokens=1,
        assistant_text=f"a{n}",
        assistant_tokens=1,
    )


async def test_prune_history_forgets_whole_turns_older_than_the_cutoff(storage: Storage) -> None:
    await _turn(storage, 1)
    await _turn(storage, 2)
    await asyncio.sleep(0.01)
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await _turn(storage, 3)
    assert await storage.prune_history(cutoff) == 4
    assert [(t.user, t.assistant) for t in await storage.recent_turns(CHANNEL, 10)] == [("q3", "a3")]
    assert await storage.prune_history(cutoff) == 0
