"""What the core needs from a database, as the core defines it: the delivery state machine of an
event and a conversation's history. ``storage.repository.Storage`` implements it on SQLAlchemy;
unit tests may use an in-memory stand-in. Nothing here imports storage (no bot <-> storage cycle).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from bot.events import ChannelRef


class ClaimResult(enum.StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    TAKEOVER = "takeover"  # recorded by a replica that died before finishing it; now it is ours


class EventStatus(enum.StrEnum):
    RECEIVED = "received"  # recorded; not started
    GENERATING = "generating"  # its conversation's turn came; the answer is being written
    ANSWERED = "answered"  # the turn and the final text (the outbox) are stored; not yet shown
    DELIVERED = "delivered"  # the platform confirmed the final text
    SKIPPED = "skipped"  # nothing to answer (a follow-up without history, a deleted question)
    FAILED = "failed"  # the platform refused the final text for good


class FinalKind(enum.StrEnum):
    TEXT = "text"  # shown as the answer
    ERROR = "error"  # shown as a failure note


class LostClaim(Exception):
    """Another replica took the event over (this one was presumed dead): stop working on it."""


UNFINISHED = (EventStatus.RECEIVED, EventStatus.GENERATING, EventStatus.ANSWERED)
NOT_ANSWERED = (EventStatus.RECEIVED, EventStatus.GENERATING)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One processed_events row, as the core resumes it."""

    id: int  # the arrival sequence: a conversation is answered in this order
    platform: str
    event_id: str
    conversation: str
    status: EventStatus
    owner: str
    payload: dict[str, Any]
    reply_handle: dict[str, Any] | None
    final_text: str | None
    final_kind: str | None
    attempts: int
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Claim:
    result: ClaimResult
    event: StoredEvent | None  # None for a duplicate


@dataclass(frozen=True, slots=True)
class StoredTurn:
    user: str
    assistant: str
    user_tokens: int
    assistant_tokens: int
    created_at: datetime


class Store(Protocol):
    """The storage calls ``bot.core.Bot`` makes (see ``storage.repository.Storage`` for each)."""

    async def record_event(
        self, platform: str, event_id: str, conversation: str, payload: dict[str, Any]
    ) -> Claim: ...

    async def orphaned_events(self, since: datetime) -> list[StoredEvent]: ...

    async def take_over(self, event: StoredEvent) -> StoredEvent | None: ...

    async def renew_leases(self) -> int: ...

    async def release_leases(self) -> int: ...

    async def expire_events(self, before: datetime) -> int: ...

    async def nearest_unanswered_before(self, event: StoredEvent) -> StoredEvent | None: ...

    async def set_status(
        self, event: StoredEvent, status: EventStatus, *, error: str | None = None
    ) -> bool: ...

    async def save_reply_handle(self, event: StoredEvent, handle: dict[str, Any] | None) -> bool: ...

    async def save_final(self, event: StoredEvent, text: str, kind: FinalKind) -> bool: ...

    async def delivery_failed(
        self, event: StoredEvent, attempts: int, error: str, retry_at: datetime
    ) -> bool: ...

    async def has_history(self, channel: ChannelRef) -> bool: ...

    async def recent_turns(self, channel: ChannelRef, limit: int) -> list[StoredTurn]: ...

    async def append_turn(
        self,
        channel: ChannelRef,
        *,
        author_id: str,
        author_name: str,
        user_text: str,
        user_tokens: int,
        assistant_text: str,
        assistant_tokens: int,
        event: StoredEvent | None = None,
        final_text: str | None = None,
    ) -> None: ...

    async def clear(
        self, channel: ChannelRef, *, event: StoredEvent | None = None, final_text: str = ""
    ) -> int: ...
