"""Event claims (dedupe and takeover after a crash), statuses, recovery and pruning."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from storage.db import create_engine, normalize_url
from storage.models import ProcessedEvent
from storage.repository import ClaimResult, EventStatus, Storage

OpenStorage = Callable[[str], Awaitable[Storage]]
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _payload(event_id: str) -> dict[str, object]:
    return {"event_id": event_id, "text": "你好 👋", "raw": {"nested": [1, 2.5, None, True]}}


async def _age(database_url: str, event_id: str, received_at: datetime) -> None:
    """Back-date one event, as if it had been received at ``received_at``."""
    engine = create_engine(normalize_url(database_url))
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(ProcessedEvent)
                .where(ProcessedEvent.event_id == event_id)
                .values(received_at=received_at)
            )
    finally:
        await engine.dispose()


async def test_first_claim_is_new_and_repeats_are_duplicates(storage: Storage) -> None:
    assert await storage.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.NEW
    assert await storage.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.DUPLICATE
    # The key is (platform, event_id): the same id on another platform is another event.
    assert await storage.claim_event("discord", "Ev1", _payload("Ev1")) is ClaimResult.NEW


async def test_a_restarted_process_takes_over_an_unanswered_event_once(
    storage: Storage, open_storage: OpenStorage
) -> None:
    await storage.claim_event("slack", "Ev1", _payload("Ev1"))
    restarted = await open_storage("second")
    assert await restarted.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.TAKEOVER
    assert await restarted.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.DUPLICATE
    assert await restarted.unanswered_events(LONG_AGO) == []


async def test_a_live_peer_s_event_is_not_taken_over(storage: Storage, open_storage: OpenStorage) -> None:
    peer = await open_storage("peer")  # running alongside "first", not a restart of it
    await storage.claim_event("slack", "Ev1", _payload("Ev1"))
    assert await peer.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.DUPLICATE
    # A process started after the claim may take it over; then the claim is live again.
    restarted = await open_storage("second")
    assert await restarted.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.TAKEOVER
    assert await storage.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.DUPLICATE
    assert await peer.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.DUPLICATE


@pytest.mark.parametrize("status", [EventStatus.ANSWERED, EventStatus.FAILED])
async def test_finished_events_are_never_taken_over(
    storage: Storage, open_storage: OpenStorage, status: EventStatus
) -> None:
    await storage.claim_event("slack", "Ev1", _payload("Ev1"))
    await storage.mark_event("slack", "Ev1", status)
    restarted = await open_storage("second")
    assert await restarted.claim_event("slack", "Ev1", _payload("Ev1")) is ClaimResult.DUPLICATE
    assert await restarted.unanswered_events(LONG_AGO) == []


async def test_unanswered_events_are_other_owners_received_events_oldest_first(
    storage: Storage, open_storage: OpenStorage, database_url: str
) -> None:
    for event_id in ("old", "a", "b", "answered", "failed"):
        await storage.claim_event("slack", event_id, _payload(event_id))
    await storage.mark_event("slack", "answered", EventStatus.ANSWERED)
    await storage.mark_event("slack", "failed", EventStatus.FAILED)
    await _age(database_url, "old", datetime.now(UTC) - timedelta(hours=2))
    await _age(database_url, "b", datetime.now(UTC) - timedelta(minutes=5))

    assert await storage.unanswered_events(LONG_AGO) == []  # its own events are in progress, not lost
    restarted = await open_storage("second")
    since = datetime.now(UTC) - timedelta(hours=1)
    assert await restarted.unanswered_events(since) == [_payload("b"), _payload("a")]
    assert [p["event_id"] for p in await restarted.unanswered_events(LONG_AGO)] == ["old", "b", "a"]


async def test_mark_event_of_an_unknown_event_changes_nothing(
    storage: Storage, open_storage: OpenStorage
) -> None:
    await storage.claim_event("slack", "known", _payload("known"))
    await storage.mark_event("slack", "unknown", EventStatus.ANSWERED)
    restarted = await open_storage("second")
    assert await restarted.unanswered_events(LONG_AGO) == [_payload("known")]


async def test_prune_removes_old_events_of_every_status(storage: Storage, database_url: str) -> None:
    statuses = {"r": None, "a": EventStatus.ANSWERED, "f": EventStatus.FAILED}
    for prefix, status in statuses.items():
        for age in ("old", "new"):
            await storage.claim_event("slack", f"{prefix}-{age}", {})
            if status is not None:
                await storage.mark_event("slack", f"{prefix}-{age}", status)
            if age == "old":
                await _age(database_url, f"{prefix}-{age}", datetime.now(UTC) - timedelta(days=4))

    assert await storage.prune_events(datetime.now(UTC) - timedelta(days=3)) == 3
    for prefix in statuses:
        assert await storage.claim_event("slack", f"{prefix}-old", {}) is ClaimResult.NEW
        assert await storage.claim_event("slack", f"{prefix}-new", {}) is ClaimResult.DUPLICATE
    assert await storage.prune_events(datetime.now(UTC) + timedelta(seconds=1)) == 6


async def test_naive_datetimes_are_refused(storage: Storage) -> None:
    with pytest.raises(ValueError, match="naive"):
        await storage.unanswered_events(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        await storage.prune_events(datetime(2024, 1, 1))
