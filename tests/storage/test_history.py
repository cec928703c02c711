"""Conversation history: turns in order, per-thread conversations, clearing, atomic appends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from bot.events import ChannelRef
from storage.repository import EventStatus, Storage

OpenStorage = Callable[[str], Awaitable[Storage]]
CHANNEL = ChannelRef("slack", "C1")


async def _turn(storage: Storage, channel: ChannelRef, n: int, **overrides: object) -> None:
    fields: dict[str, object] = {
        "author_id": "U1",
        "author_name": "Ada",
        "user_text": f"q{n}",
        "user_tokens": n,
        "assistant_text": f"a{n}",
        "assistant_tokens": n + 100,
    } | overrides
    await storage.append_turn(channel, **fields)  # type: ignore[arg-type]


async def test_recent_turns_are_the_newest_n_oldest_first(storage: Storage) -> None:
    assert await storage.recent_turns(CHANNEL, 10) == []
    for n in range(5):
        await _turn(storage, CHANNEL, n)
    turns = await storage.recent_turns(CHANNEL, 3)
    assert [(t.user, t.assistant, t.user_tokens, t.assistant_tokens) for t in turns] == [
        ("q2", "a2", 2, 102),
        ("q3", "a3", 3, 103),
        ("q4", "a4", 4, 104),
    ]
    assert [t.user for t in await storage.recent_turns(CHANNEL, 50)] == [f"q{n}" for n in range(5)]
    assert await storage.recent_turns(CHANNEL, 0) == []


async def test_turn_timestamps_are_aware_utc(storage: Storage) -> None:
    before = datetime.now(UTC)
    await _turn(storage, CHANNEL, 1)
    (turn,) = await storage.recent_turns(CHANNEL, 1)
    assert turn.created_at.tzinfo is not None
    assert turn.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= turn.created_at <= datetime.now(UTC) + timedelta(seconds=1)


async def test_threads_and_channels_are_separate_conversations(storage: Storage) -> None:
    channels = [
        ChannelRef("slack", "C1"),
        ChannelRef("slack", "C1", "1700000000.000100"),
        ChannelRef("slack", "C1", "1700000000.000200"),
        ChannelRef("slack", "C2"),
        ChannelRef("discord", "C1"),
    ]
    for n, channel in enumerate(channels):
        assert not await storage.has_history(channel)
        await _turn(storage, channel, n)
    for n, channel in enumerate(channels):
        assert await storage.has_history(channel)
        assert [t.user for t in await storage.recent_turns(channel, 10)] == [f"q{n}"]


async def test_clear_deletes_only_that_conversation(storage: Storage) -> None:
    thread = ChannelRef("slack", "C1", "t1")
    for n in range(3):
        await _turn(storage, CHANNEL, n)
    await _turn(storage, thread, 9)
    assert await storage.clear(CHANNEL) == 6  # three turns, two messages each
    assert not await storage.has_history(CHANNEL)
    assert await storage.recent_turns(CHANNEL, 10) == []
    assert [t.user for t in await storage.recent_turns(thread, 10)] == ["q9"]
    assert await storage.clear(CHANNEL) == 0
    assert await storage.clear(ChannelRef("slack", "never-seen")) == 0
    await _turn(storage, CHANNEL, 7)  # a cleared conversation continues normally
    assert [t.user for t in await storage.recent_turns(CHANNEL, 10)] == ["q7"]


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！今天天气怎么样？",
        "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵",
        "mixed: שלום مرحبا こんにちは 안녕하세요 e\u0301",
        "x" * 20_000,
        "line\nbreaks\r\n\ttabs 'quotes' \"double\" \\backslash; DROP TABLE messages; --",
    ],
)
async def test_unicode_and_long_content_round_trips(storage: Storage, text: str) -> None:
    await _turn(storage, CHANNEL, 1, user_text=text, assistant_text=text[::-1], author_name="李雷 🐉")
    (turn,) = await storage.recent_turns(CHANNEL, 1)
    assert (turn.user, turn.assistant) == (text, text[::-1])


async def test_unstorable_characters_are_replaced_not_fatal(storage: Storage) -> None:
    # PostgreSQL text refuses NUL; a lone surrogate (from a JSON "\ud800" escape) has no UTF-8 form.
    await _turn(storage, CHANNEL, 1, user_text="a\x00b", assistant_text="c\ud800d")
    (turn,) = await storage.recent_turns(CHANNEL, 1)
    assert (turn.user, turn.assistant) == ("a\ufffdb", "c?d")


async def test_append_turn_puts_the_answer_in_its_event_s_outbox(
    storage: Storage, open_storage: OpenStorage
) -> None:
    first = (await storage.record_event("slack", "Ev1", str(CHANNEL), {"event_id": "Ev1"})).event
    await storage.record_event("slack", "Ev2", str(CHANNEL), {"event_id": "Ev2"})
    assert first is not None
    await _turn(storage, CHANNEL, 1, event=first)
    restarted = await open_storage("replica-a#2")
    orphans = await restarted.orphaned_events(datetime.now(UTC) - timedelta(hours=1))
    # Answered but not yet delivered: the next process delivers the stored text, it does not regenerate.
    assert [(o.event_id, o.status, o.final_text) for o in orphans] == [
        ("Ev1", EventStatus.ANSWERED, "a1"),
        ("Ev2", EventStatus.RECEIVED, None),
    ]


async def test_append_turn_is_all_or_nothing(storage: Storage, open_storage: OpenStorage) -> None:
    event = (await storage.record_event("slack", "Ev1", "slack:C1/t-new", {"event_id": "Ev1"})).event
    assert event is not None
    new_thread = ChannelRef("slack", "C1", "t-new")
    # A negative token count violates a CHECK constraint on the second (assistant) insert.
    with pytest.raises(IntegrityError):
        await _turn(storage, new_thread, 1, assistant_tokens=-1, event=event)
    assert not await storage.has_history(new_thread)
    restarted = await open_storage("replica-a#2")
    since = datetime.now(UTC) - timedelta(hours=1)
    assert [(o.event_id, o.status) for o in await restarted.orphaned_events(since)] == [
        ("Ev1", EventStatus.RECEIVED)
    ]
    await _turn(storage, new_thread, 2, event=event)
    assert [(t.user, t.assistant) for t in await storage.recent_turns(new_thread, 5)] == [("q2", "a2")]
    # replica-a#1 wrote after replica-a#2 started, so it is alive to #2; a later start sees the outbox.
    assert await restarted.orphaned_events(since) == []
    later = await open_storage("replica-a#3")
    assert [o.status for o in await later.orphaned_events(since)] == [EventStatus.ANSWERED]
