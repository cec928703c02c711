"""Many concurrent writers: nothing is lost, nothing fails with "database is locked", claims stay exclusive.

On SQLite two Storage instances (two engines, two connection pools) write the same file at once,
which is what two processes do; on PostgreSQL the same code exercises row locks and ON CONFLICT.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from bot.events import ChannelRef
from storage.repository import ClaimResult, EventStatus, Storage

OpenStorage = Callable[[str], Awaitable[Storage]]
WRITERS = 60


async def _append(storage: Storage, channel: ChannelRef, n: int) -> None:
    await storage.append_turn(
        channel,
        author_id=f"U{n}",
        author_name=f"user {n}",
        user_text=f"question {n}",
        user_tokens=n,
        assistant_text=f"answer {n}",
        assistant_tokens=n + 1,
    )


async def test_concurrent_appends_to_one_conversation_lose_nothing(
    storage: Storage, open_storage: OpenStorage
) -> None:
    other = await open_storage("other-process")
    channel = ChannelRef("slack", "C-busy", "thread")
    await asyncio.gather(*(_append((storage, other)[n % 2], channel, n) for n in range(WRITERS)))

    turns = await storage.recent_turns(channel, WRITERS * 2)
    assert len(turns) == WRITERS
    # Every answer is paired with its own question, however the transactions interleaved.
    assert {(t.user, t.assistant, t.user_tokens, t.assistant_tokens) for t in turns} == {
        (f"question {n}", f"answer {n}", n, n + 1) for n in range(WRITERS)
    }


async def test_concurrent_appends_to_many_conversations_lose_nothing(
    storage: Storage, open_storage: OpenStorage
) -> None:
    other = await open_storage("other-process")
    channels = [ChannelRef("discord", f"C{n % 12}", None if n % 3 else f"T{n % 12}") for n in range(WRITERS)]
    await asyncio.gather(*(_append((storage, other)[n % 2], ch, n) for n, ch in enumerate(channels)))

    for channel, expected in Counter(channels).items():
        turns = await storage.recent_turns(channel, WRITERS)
        assert len(turns) == expected
        assert all(t.user.replace("question", "answer") == t.assistant for t in turns)


async def test_concurrent_records_of_one_event_give_exactly_one_new(storage: Storage) -> None:
    claims = await asyncio.gather(
        *(storage.record_event("slack", "Ev-hot", "c", {"n": n}) for n in range(50))
    )
    assert Counter(claim.result for claim in claims) == {ClaimResult.NEW: 1, ClaimResult.DUPLICATE: 49}


async def test_redeliveries_to_two_restarted_processes_are_taken_over_once(
    storage: Storage, open_storage: OpenStorage
) -> None:
    await storage.record_event("slack", "Ev-orphan", "c", {})  # then replica-a#1 crashes
    restarted = [await open_storage("replica-a#2"), await open_storage("replica-a#3")]
    claims = await asyncio.gather(
        *(restarted[n % 2].record_event("slack", "Ev-orphan", "c", {}) for n in range(50))
    )
    assert Counter(claim.result for claim in claims) == {ClaimResult.TAKEOVER: 1, ClaimResult.DUPLICATE: 49}


async def test_two_replicas_recording_one_conversation_keep_one_order(
    storage: Storage, open_storage: OpenStorage
) -> None:
    # Ids are the conversation's arrival order: never committed out of order, whoever writes.
    peer = await open_storage("replica-b#1")
    claims = await asyncio.gather(
        *((storage, peer)[n % 2].record_event("slack", f"Ev{n}", "c", {}) for n in range(WRITERS))
    )
    events = [claim.event for claim in claims if claim.event is not None]
    assert len(events) == WRITERS
    assert len({event.id for event in events}) == WRITERS
    newest = max(events, key=lambda event: event.id)
    ahead = await peer.nearest_unanswered_before(newest)
    assert ahead is not None and ahead.id == sorted(event.id for event in events)[-2]


async def test_mixed_concurrent_writes_all_succeed(storage: Storage, open_storage: OpenStorage) -> None:
    other = await open_storage("replica-b#1")
    channel = ChannelRef("console", "local")

    async def _answer(n: int) -> None:
        instance = (storage, other)[n % 2]
        claim = await instance.record_event("console", f"e{n}", str(channel), {"n": n})
        assert claim.result is ClaimResult.NEW and claim.event is not None
        await instance.append_turn(
            channel,
            author_id="u",
            author_name="u",
            user_text=f"q{n}",
            user_tokens=1,
            assistant_text=f"a{n}",
            assistant_tokens=1,
            event=claim.event,
        )
        assert await instance.set_status(claim.event, EventStatus.DELIVERED)

    await asyncio.gather(*(_answer(n) for n in range(WRITERS)), storage.clear(ChannelRef("console", "x")))
    assert len(await storage.recent_turns(channel, WRITERS)) == WRITERS
    third = await open_storage("replica-a#2")
    assert await third.orphaned_events(datetime(2000, 1, 1, tzinfo=UTC)) == []
