"""Events: recording (dedupe, arrival order), leases and take-over, the delivery states, pruning."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from bot.events import ChannelRef
from storage.db import create_engine, normalize_url
from storage.models import ProcessedEvent
from storage.repository import ClaimResult, EventStatus, FinalKind, LostClaim, Storage, StoredEvent

OpenStorage = Callable[[str], Awaitable[Storage]]
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
RESTARTED = "replica-a#2"  # the fixture's replica, a later incarnation: its predecessor is dead
PEER = "replica-b#1"  # another replica, alive until its leases run out
CONVERSATION = "slack:C1/1.0"


def _payload(event_id: str) -> dict[str, object]:
    return {"event_id": event_id, "text": "你好 👋", "raw": {"nested": [1, 2.5, None, True]}}


async def _record(storage: Storage, event_id: str, conversation: str = CONVERSATION) -> StoredEvent:
    claim = await storage.record_event("slack", event_id, conversation, _payload(event_id))
    assert claim.result is ClaimResult.NEW and claim.event is not None
    return claim.event


async def _set(database_url: str, event_id: str, **values: object) -> None:
    """Change one event's row behind the repository's back (age it, expire its lease)."""
    engine = create_engine(normalize_url(database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(ProcessedEvent).where(ProcessedEvent.event_id == event_id).values(**values)
            )
    finally:
        await engine.dispose()


async def test_first_record_is_new_and_repeats_are_duplicates(storage: Storage) -> None:
    event = await _record(storage, "Ev1")
    assert (event.status, event.payload, event.conversation) == (
        EventStatus.RECEIVED,
        _payload("Ev1"),
        CONVERSATION,
    )
    again = await storage.record_event("slack", "Ev1", CONVERSATION, _payload("Ev1"))
    assert (again.result, again.event) == (ClaimResult.DUPLICATE, None)
    # The key is (platform, event_id): the same id on another platform is another event.
    other = await storage.record_event("discord", "Ev1", "discord:C1", _payload("Ev1"))
    assert other.result is ClaimResult.NEW


async def test_arrival_order_is_the_order_of_recording(storage: Storage) -> None:
    events = [await _record(storage, f"Ev{n}") for n in range(5)]
    assert [event.id for event in events] == sorted(event.id for event in events)
    # The conversation's order: each event waits for the oldest earlier one not answered yet.
    assert await storage.nearest_unanswered_before(events[0]) is None
    blocker = await storage.nearest_unanswered_before(events[3])
    assert blocker is not None and blocker.event_id == "Ev2"
    assert await storage.save_final(events[2], "done", FinalKind.TEXT)
    blocker = await storage.nearest_unanswered_before(events[3])
    assert blocker is not None and blocker.event_id == "Ev1"
    for event in events[:2]:
        assert await storage.set_status(event, EventStatus.SKIPPED)
    assert await storage.nearest_unanswered_before(events[3]) is None
    other = await _record(storage, "elsewhere", "slack:C2")
    assert await storage.nearest_unanswered_before(other) is None


async def test_a_restarted_replica_takes_over_its_predecessor_s_events_at_once(
    storage: Storage, open_storage: OpenStorage
) -> None:
    await _record(storage, "Ev1")  # then replica-a#1 is killed
    restarted = await open_storage(RESTARTED)
    claim = await restarted.record_event("slack", "Ev1", CONVERSATION, _payload("Ev1"))  # a redelivery
    assert claim.result is ClaimResult.TAKEOVER and claim.event is not None
    assert claim.event.owner == RESTARTED
    again = await restarted.record_event("slack", "Ev1", CONVERSATION, _payload("Ev1"))
    assert again.result is ClaimResult.DUPLICATE
    assert await restarted.orphaned_events(LONG_AGO) == []


async def test_a_live_peer_s_event_is_taken_over_only_after_its_lease_expires(
    storage: Storage, open_storage: OpenStorage, database_url: str
) -> None:
    peer = await open_storage(PEER)
    event = await _record(storage, "Ev1")
    assert (await peer.record_event("slack", "Ev1", CONVERSATION, {})).result is ClaimResult.DUPLICATE
    assert await peer.orphaned_events(LONG_AGO) == []
    assert await peer.take_over(event) is None
    # The heartbeat keeps it alive; once it stops (the owner died), the lease runs out.
    assert await storage.renew_leases() == 1
    await _set(database_url, "Ev1", lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
    (orphan,) = await peer.orphaned_events(LONG_AGO)
    taken = await peer.take_over(orphan)
    assert taken is not None and taken.owner == PEER
    # The old owner, if it was only slow, finds out and stops: it can no longer change the event.
    assert not await storage.set_status(event, EventStatus.GENERATING)
    with pytest.raises(LostClaim):
        await storage.append_turn(
            ChannelRef("slack", "C1", "1.0"),
            author_id="u",
            author_name="u",
            user_text="q",
            user_tokens=1,
            assistant_text="a",
            assistant_tokens=1,
            event=event,
        )
    assert not await storage.has_history(ChannelRef("slack", "C1", "1.0"))  # all or nothing


async def test_released_leases_are_taken_over_at_once(storage: Storage, open_storage: OpenStorage) -> None:
    await _record(storage, "Ev1")
    peer = await open_storage(PEER)
    assert await peer.orphaned_events(LONG_AGO) == []
    assert await storage.release_leases() == 1  # a graceful shutdown
    assert [event.event_id for event in await peer.orphaned_events(LONG_AGO)] == ["Ev1"]


@pytest.mark.parametrize("status", [EventStatus.DELIVERED, EventStatus.SKIPPED, EventStatus.FAILED])
async def test_finished_events_are_never_taken_over(
    storage: Storage, open_storage: OpenStorage, status: EventStatus
) -> None:
    event = await _record(storage, "Ev1")
    assert await storage.set_status(event, status)
    restarted = await open_storage(RESTARTED)
    assert (await restarted.record_event("slack", "Ev1", CONVERSATION, {})).result is ClaimResult.DUPLICATE
    assert await restarted.orphaned_events(LONG_AGO) == []


async def test_orphans_are_every_unfinished_state_in_the_window_oldest_first(
    storage: Storage, open_storage: OpenStorage, database_url: str
) -> None:
    events = {name: await _record(storage, name) for name in ("old", "a", "b", "c", "done")}
    await storage.set_status(events["b"], EventStatus.GENERATING)
    await storage.save_reply_handle(events["b"], {"ts": ["1.1"]})
    await storage.save_final(events["c"], "the answer", FinalKind.TEXT)
    await storage.set_status(events["done"], EventStatus.DELIVERED)
    await _set(database_url, "old", received_at=datetime.now(UTC) - timedelta(hours=2))

    assert await storage.orphaned_events(LONG_AGO) == []  # its own events are in progress, not lost
    restarted = await open_storage(RESTARTED)
    since = datetime.now(UTC) - timedelta(hours=1)
    orphans = await restarted.orphaned_events(since)
    assert [(o.event_id, o.status) for o in orphans] == [
        ("a", EventStatus.RECEIVED),
        ("b", EventStatus.GENERATING),
        ("c", EventStatus.ANSWERED),
    ]
    assert orphans[1].reply_handle == {"ts": ["1.1"]}
    assert (orphans[2].final_text, orphans[2].final_kind) == ("the answer", "text")
    # Too old to resume: given up, and then it no longer holds its conversation back.
    assert await restarted.expire_events(since) == 1
    state = await restarted.event_state("slack", "old")
    assert state is not None and state.status is EventStatus.FAILED
    taken = await restarted.take_over(orphans[0])
    assert taken is not None and await restarted.nearest_unanswered_before(taken) is None


async def test_concurrent_take_overs_have_one_winner(storage: Storage, open_storage: OpenStorage) -> None:
    await _record(storage, "Ev1")
    replicas = [await open_storage(f"replica-a#{n}") for n in range(2, 5)]
    (orphan,) = await replicas[0].orphaned_events(LONG_AGO)
    results = await asyncio.gather(*(replica.take_over(orphan) for replica in replicas))
    assert sum(result is not None for result in results) == 1


async def test_delivery_attempts_are_recorded(storage: Storage) -> None:
    event = await _record(storage, "Ev1")
    await storage.save_final(event, "answer", FinalKind.TEXT)
    retry_at = datetime.now(UTC) + timedelta(seconds=4)
    assert await storage.delivery_failed(event, 2, "HTTP 503" * 100, retry_at)
    state = await storage.event_state("slack", "Ev1")
    assert state is not None and (state.status, state.attempts) == (EventStatus.ANSWERED, 2)
    assert await storage.set_status(state, EventStatus.DELIVERED)
    assert (await storage.event_state("slack", "Ev1")).status is EventStatus.DELIVERED  # type: ignore[union-attr]


async def test_prune_removes_old_events_of_every_status(storage: Storage, database_url: str) -> None:
    statuses = [None, EventStatus.DELIVERED, EventStatus.FAILED]
    for n, status in enumerate(statuses):
        for age in ("old", "new"):
            event = await _record(storage, f"{n}-{age}")
            if status is not None:
                await storage.set_status(event, status)
            if age == "old":
                await _set(database_url, f"{n}-{age}", received_at=datetime.now(UTC) - timedelta(days=4))

    assert await storage.prune_events(datetime.now(UTC) - timedelta(days=3)) == 3
    for n in range(len(statuses)):
        assert (await storage.record_event("slack", f"{n}-old", CONVERSATION, {})).result is ClaimResult.NEW
        assert (
            await storage.record_event("slack", f"{n}-new", CONVERSATION, {})
        ).result is ClaimResult.DUPLICATE
    assert await storage.prune_events(datetime.now(UTC) + timedelta(seconds=1)) == 6


async def test_naive_datetimes_are_refused(storage: Storage) -> None:
    with pytest.raises(ValueError, match="naive"):
        await storage.orphaned_events(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        await storage.prune_events(datetime(2024, 1, 1))
