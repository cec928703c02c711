"""The storage the core uses (``bot.store.Store``) on SQLAlchemy: event recording, leases and the
delivery states, conversation history. All SQL lives here."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from alembic.util import CommandError
from sqlalchemy import CursorResult, Result, Select, delete, exists, func, select, update
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from bot.config import ConfigError
from bot.events import ChannelRef
from bot.store import (
    NOT_ANSWERED,
    UNFINISHED,
    Claim,
    ClaimResult,
    EventStatus,
    FinalKind,
    LostClaim,
    StoredEvent,
    StoredTurn,
)
from storage.db import SQLITE_IMMEDIATE, create_engine, normalize_url
from storage.migrate import upgrade_to_head
from storage.models import Conversation, Message, ProcessedEvent, utcnow

__all__ = [  # the value types live in bot.store; importing them from here works too
    "NOT_ANSWERED",
    "UNFINISHED",
    "Claim",
    "ClaimResult",
    "EventStatus",
    "FinalKind",
    "LostClaim",
    "Storage",
    "StoredEvent",
    "StoredTurn",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _uncancellable(
    method: Callable[Concatenate[Storage, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Storage, _P], Coroutine[Any, Any, _T]]:
    """Run the call to completion even when its caller is cancelled (the caller still sees the
    cancellation at once). A transaction cut off mid-way by cancellation can leave a driver
    connection, and SQLite's write lock, busy until the busy timeout; finishing it is cheap."""

    async def wrapper(self: Storage, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        task = asyncio.ensure_future(method(self, *args, **kwargs))
        self._pending.add(task)
        task.add_done_callback(_settle)
        task.add_done_callback(self._pending.discard)
        return await asyncio.shield(task)

    functools.update_wrapper(wrapper, method)
    return wrapper


def _settle(task: asyncio.Future[Any]) -> None:
    """Mark a shielded call's error as seen; its caller, if still waiting, gets it anyway."""
    if not task.cancelled():
        task.exception()


class Storage:
    """One process's handle on the database.

    ``owner`` ("replica#incarnation") marks the events this process recorded or took over. Its
    claims carry a lease of ``lease_s`` seconds that ``renew_leases`` extends; an event is taken
    over only when its lease has run out, or when its owner is an earlier incarnation of this same
    replica that has not touched it since this one started (a replica id names one live process at a
    time, so that one is dead; one that claimed it later is alive)."""

    def __init__(self, engine: AsyncEngine, owner: str, *, lease_s: float = 30.0) -> None:
        self.owner = owner
        self.replica = owner.partition("#")[0]
        self.lease_s = lease_s
        self.started_at = utcnow()
        self._engine = engine
        self._dialect = engine.dialect.name
        self._reads = async_sessionmaker(engine, expire_on_commit=False)
        writer = engine.execution_options(**{SQLITE_IMMEDIATE: True})
        self._writes = async_sessionmaker(writer, expire_on_commit=False)
        self._pending: set[asyncio.Future[Any]] = set()
        self.location = engine.url.render_as_string(hide_password=True)  # for logs: no password

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        instance_id: str | None = None,
        replica_id: str | None = None,
        lease_s: float = 30.0,
        data_dir: Path | None = None,
    ) -> Storage:
        """Connect to ``url`` (see ``storage.db.normalize_url``, with ``data_dir`` the base of a
        relative SQLite path) and migrate it to the newest schema. ``instance_id`` is the whole
        owner string; otherwise it is ``replica_id`` (default: a random one) + a fresh incarnation."""
        normalized = normalize_url(url, data_dir)
        engine = create_engine(normalized)
        try:
            await upgrade_to_head(engine)
        except (OSError, DBAPIError, CommandError) as exc:
            await engine.dispose()
            shown = normalized.render_as_string(hide_password=True)
            raise ConfigError(f"cannot open database {shown}: {_one_line(exc)}") from exc
        except BaseException:
            await engine.dispose()
            raise
        owner = instance_id or f"{replica_id or uuid.uuid4().hex[:12]}#{uuid.uuid4().hex[:12]}"
        return cls(engine, owner, lease_s=lease_s)

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """Whether the database answers a trivial query within ``timeout_s`` (for /healthz)."""
        try:
            async with asyncio.timeout(timeout_s), self._engine.connect() as connection:
                await connection.execute(select(1))
        except (OSError, DBAPIError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        if self._pending:  # calls whose callers were cancelled finish first
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._engine.dispose()

    # -- events: recording and claims ------------------------------------------------------------

    @_uncancellable
    async def record_event(
        self, platform: str, event_id: str, conversation: str, payload: dict[str, Any]
    ) -> Claim:
        """Record a platform event at acceptance; only a NEW or TAKEOVER claim is to be worked on.

        Its ``id`` is its arrival sequence. Within one conversation ids are handed out and committed
        in the same order on every backend (SQLite writes one transaction at a time; on PostgreSQL a
        per-conversation advisory lock serialises the insert), so no reader ever sees a later id
        before an earlier one. A redelivered event whose owner is gone is taken over (TAKEOVER)."""
        now = utcnow()
        async with self._write() as session:
            if self._dialect == "postgresql":
                await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(conversation))))
            insert = self._insert(ProcessedEvent).values(
                platform=platform,
                event_id=event_id,
                conversation=conversation,
                status=EventStatus.RECEIVED.value,
                owner=self.owner,
                payload=payload,
                received_at=now,
                updated_at=now,
                lease_expires_at=now + timedelta(seconds=self.lease_s),
                attempts=0,
            )
            claimed = await session.scalar(
                insert.on_conflict_do_nothing(index_elements=["platform", "event_id"]).returning(
                    ProcessedEvent.id
                )
            )
            if claimed is not None:
                return Claim(ClaimResult.NEW, _stored(await session.get_one(ProcessedEvent, claimed)))
            row = await session.scalar(
                select(ProcessedEvent).where(
                    ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id
                )
            )
            if row is None or not self._may_take(row, now):
                return Claim(ClaimResult.DUPLICATE, None)
            taken = await self._take(session, row, now)
            return Claim(ClaimResult.TAKEOVER, taken) if taken else Claim(ClaimResult.DUPLICATE, None)

    @_uncancellable
    async def orphaned_events(self, since: datetime) -> list[StoredEvent]:
        """Unfinished events received at or after ``since`` whose owner is gone (see the class
        docstring), oldest first: what this replica should take over and finish."""
        _require_aware(since)
        now = utcnow()
        async with self._read() as session:
            rows = await session.scalars(
                select(ProcessedEvent)
                .where(
                    ProcessedEvent.status.in_([status.value for status in UNFINISHED]),
                    ProcessedEvent.received_at >= since,
                    ProcessedEvent.owner != self.owner,
                )
                .order_by(ProcessedEvent.id)
            )
            return [_stored(row) for row in rows if self._may_take(row, now)]

    @_uncancellable
    async def take_over(self, event: StoredEvent) -> StoredEvent | None:
        """Claim ``event`` from its gone owner; None if another replica was quicker."""
        now = utcnow()
        async with self._write() as session:
            row = await session.get(ProcessedEvent, event.id)
            if row is None or row.owner != event.owner or not self._may_take(row, now):
                return None
            return await self._take(session, row, now)

    @_uncancellable
    async def renew_leases(self) -> int:
        """The heartbeat: extend the lease of every unfinished event this process owns."""
        now = utcnow()
        async with self._write() as session:
            result = await session.execute(
                update(ProcessedEvent)
                .where(
                    ProcessedEvent.owner == self.owner,
                    ProcessedEvent.status.in_([status.value for status in UNFINISHED]),
                )
                .values(lease_expires_at=now + timedelta(seconds=self.lease_s))
            )
            return _rowcount(result)

    @_uncancellable
    async def release_leases(self) -> int:
        """At shutdown: let any replica take over this process's unfinished events at once."""
        async with self._write() as session:
            result = await session.execute(
                update(ProcessedEvent)
                .where(
                    ProcessedEvent.owner == self.owner,
                    ProcessedEvent.status.in_([status.value for status in UNFINISHED]),
                )
                .values(lease_expires_at=utcnow())
            )
            return _rowcount(result)

    # -- events: the delivery state machine ------------------------------------------------------

    @_uncancellable
    async def nearest_unanswered_before(self, event: StoredEvent) -> StoredEvent | None:
        """The latest event of ``event``'s conversation that arrived before it and is not answered
        yet (None: it is the conversation's turn). Waiting on the nearest one, not the oldest, lets
        a process's queued messages wait on each other instead of all polling the same blocker.
        (Events too old to be resumed stop counting once ``expire_events`` has given them up.)"""
        async with self._read() as session:
            row = await session.scalar(
                select(ProcessedEvent)
                .where(
                    ProcessedEvent.conversation == event.conversation,
                    ProcessedEvent.id < event.id,
                    ProcessedEvent.status.in_([status.value for status in NOT_ANSWERED]),
                )
                .order_by(ProcessedEvent.id.desc())
                .limit(1)
            )
            return _stored(row) if row is not None else None

    @_uncancellable
    async def set_status(self, event: StoredEvent, status: EventStatus, *, error: str | None = None) -> bool:
        """Move an owned event to ``status``; False if this process no longer owns it."""
        values: dict[str, Any] = {"status": status.value, "updated_at": utcnow()}
        if error is not None:
            values["last_error"] = error[:255]
        return await self._update_owned(event, values)

    @_uncancellable
    async def save_reply_handle(self, event: StoredEvent, handle: dict[str, Any] | None) -> bool:
        """Where the answer is shown (the platform's message ids), so a resumed answer edits it."""
        return await self._update_owned(event, {"reply_handle": handle, "updated_at": utcnow()})

    @_uncancellable
    async def save_final(self, event: StoredEvent, text: str, kind: FinalKind) -> bool:
        """Put a final text that needs no turn (a command's answer, a note) in the outbox."""
        values = {
            "status": EventStatus.ANSWERED.value,
            "final_text": _storable(text),
            "final_kind": kind.value,
            "updated_at": utcnow(),
        }
        return await self._update_owned(event, values)

    @_uncancellable
    async def delivery_failed(
        self, event: StoredEvent, attempts: int, error: str, retry_at: datetime
    ) -> bool:
        """A delivery attempt of the outbox text failed and will be tried again at ``retry_at``."""
        values = {"attempts": attempts, "last_error": error[:255], "next_attempt_at": retry_at}
        return await self._update_owned(event, values)

    @_uncancellable
    async def event_state(self, platform: str, event_id: str) -> StoredEvent | None:
        async with self._read() as session:
            row = await session.scalar(
                select(ProcessedEvent).where(
                    ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id
                )
            )
            return _stored(row) if row is not None else None

    @_uncancellable
    async def expire_events(self, before: datetime) -> int:
        """Unfinished events received before ``before`` (BOT_RECOVER_WINDOW_S) whose owner is gone
        are given up (failed), so they no longer hold their conversation's later messages back."""
        _require_aware(before)
        now = utcnow()
        async with self._write() as session:
            rows = await session.scalars(
                select(ProcessedEvent).where(
                    ProcessedEvent.status.in_([status.value for status in UNFINISHED]),
                    ProcessedEvent.received_at < before,
                )
            )
            expired = [row for row in rows if self._may_take(row, now)]
            for row in expired:
                row.status, row.updated_at = EventStatus.FAILED.value, now
                row.last_error = "not finished within BOT_RECOVER_WINDOW_S"
            return len(expired)

    @_uncancellable
    async def prune_events(self, older_than: datetime) -> int:
        """Forget events (of any status) received before ``older_than``; returns how many."""
        _require_aware(older_than)
        every_status = [status.value for status in EventStatus]  # so the (status, received_at) index serves
        async with self._write() as session:
            result = await session.execute(
                delete(ProcessedEvent).where(
                    ProcessedEvent.status.in_(every_status), ProcessedEvent.received_at < older_than
                )
            )
            return _rowcount(result)

    @_uncancellable
    async def prune_history(self, older_than: datetime) -> int:
        """Forget conversation turns stored before ``older_than`` (BOT_HISTORY_RETENTION_DAYS);
        returns how many messages were deleted. Answers go first: they reference their question."""
        _require_aware(older_than)
        async with self._write() as session:
            answers = await session.execute(
                delete(Message).where(Message.role == "assistant", Message.created_at < older_than)
            )
            answered = select(Message.reply_to_id).where(Message.reply_to_id.is_not(None))
            questions = await session.execute(
                delete(Message).where(
                    Message.role == "user", Message.created_at < older_than, Message.id.not_in(answered)
                )
            )
            return _rowcount(answers) + _rowcount(questions)

    # -- history --------------------------------------------------------------------------------

    @_uncancellable
    async def recent_turns(self, channel: ChannelRef, limit: int) -> list[StoredTurn]:
        """The newest ``limit`` turns of the conversation, oldest first."""
        if limit <= 0:
            return []
        user = aliased(Message)
        async with self._read() as session:
            rows = await session.execute(
                select(user.content, Message.content, user.token_count, Message.token_count, user.created_at)
                .join(user, Message.reply_to_id == user.id)
                .where(
                    Message.conversation_id == _conversation(channel).scalar_subquery(),
                    Message.role == "assistant",
                )
                .order_by(Message.id.desc())
                .limit(limit)
            )
            return [StoredTurn(*row) for row in reversed(rows.all())]

    @_uncancellable
    async def has_history(self, channel: ChannelRef) -> bool:
        async with self._read() as session:
            found = await session.scalar(
                select(exists().where(Message.conversation_id == _conversation(channel).scalar_subquery()))
            )
            return bool(found)

    @_uncancellable
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
    ) -> None:
        """Store one question and its answer and, for ``event``, put ``final_text`` (default: the
        answer) in its outbox and mark it answered: all in one transaction, so a crash never leaves
        half a turn, or a stored answer that nobody will deliver. Raises ``LostClaim`` (storing
        nothing) if another replica has taken ``event`` over."""
        now = utcnow()
        async with self._write() as session:
            await session.execute(
                self._insert(Conversation)
                .values(
                    platform=channel.platform,
                    channel_id=channel.channel_id,
                    thread_id=channel.thread_id or "",
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["platform", "channel_id", "thread_id"])
            )
            conversation_id = (await session.execute(_conversation(channel))).scalar_one()
            question = Message(
                conversation_id=conversation_id,
                role="user",
                author_id=author_id,
                author_name=_storable(author_name),
                content=_storable(user_text),
                token_count=user_tokens,
                created_at=now,
            )
            session.add(question)
            await session.flush()
            session.add(
                Message(
                    conversation_id=conversation_id,
                    role="assistant",
                    reply_to_id=question.id,
                    content=_storable(assistant_text),
                    token_count=assistant_tokens,
                    created_at=now,
                )
            )
            if event is not None:
                await self._answer_event(session, event, assistant_text if final_text is None else final_text)

    @_uncancellable
    async def clear(
        self, channel: ChannelRef, *, event: StoredEvent | None = None, final_text: str = ""
    ) -> int:
        """Delete the conversation's messages (and, for ``event``, put ``final_text`` in its outbox,
        in the same transaction); returns how many were deleted."""
        async with self._write() as session:
            if event is not None:
                await self._answer_event(session, event, final_text)
            result = await session.execute(
                delete(Message).where(Message.conversation_id == _conversation(channel).scalar_subquery()),
                execution_options={"synchronize_session": False},
            )
            return _rowcount(result)

    # -- internals ------------------------------------------------------------------------------

    def _may_take(self, row: ProcessedEvent, now: datetime) -> bool:
        if row.status not in UNFINISHED or row.owner == self.owner:
            return False
        if row.owner.partition("#")[0] == self.replica and row.updated_at < self.started_at:
            return True  # claimed by an incarnation of this replica before this one started: dead
        return row.lease_expires_at is None or row.lease_expires_at <= now

    async def _take(self, session: AsyncSession, row: ProcessedEvent, now: datetime) -> StoredEvent | None:
        # Conditional on the old owner: of several replicas sweeping at once only one wins.
        taken = await session.execute(
            update(ProcessedEvent)
            .where(ProcessedEvent.id == row.id, ProcessedEvent.owner == row.owner)
            .values(owner=self.owner, lease_expires_at=now + timedelta(seconds=self.lease_s), updated_at=now)
        )
        if _rowcount(taken) != 1:
            return None
        await session.refresh(row)
        return _stored(row)

    async def _answer_event(self, session: AsyncSession, event: StoredEvent, text: str) -> None:
        answered = await session.execute(
            update(ProcessedEvent)
            .where(ProcessedEvent.id == event.id, ProcessedEvent.owner == self.owner)
            .values(
                status=EventStatus.ANSWERED.value,
                final_text=_storable(text),
                final_kind=FinalKind.TEXT.value,
                updated_at=utcnow(),
            )
        )
        if _rowcount(answered) != 1:
            raise LostClaim(f"{event.platform} event {event.event_id} was taken over by another replica")

    async def _update_owned(self, event: StoredEvent, values: dict[str, Any]) -> bool:
        async with self._write() as session:
            result = await session.execute(
                update(ProcessedEvent)
                .where(ProcessedEvent.id == event.id, ProcessedEvent.owner == self.owner)
                .values(**values)
            )
            return _rowcount(result) == 1

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed on success."""
        async with self._writes() as session, session.begin():
            yield session

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        async with self._reads() as session, session.begin():
            yield session

    def _insert(self, table: type[Conversation] | type[ProcessedEvent]) -> pg.Insert | sqlite.Insert:
        # The dialect's own INSERT, for ON CONFLICT DO NOTHING (same syntax on both backends).
        return pg.insert(table) if self._dialect == "postgresql" else sqlite.insert(table)


def _stored(row: ProcessedEvent) -> StoredEvent:
    return StoredEvent(
        id=row.id,
        platform=row.platform,
        event_id=row.event_id,
        conversation=row.conversation,
        status=EventStatus(row.status),
        owner=row.owner,
        payload=row.payload,
        reply_handle=row.reply_handle,
        final_text=row.final_text,
        final_kind=row.final_kind,
        attempts=row.attempts,
        received_at=row.received_at,
    )


def _conversation(channel: ChannelRef) -> Select[int]:
    return select(Conversation.id).where(
        Conversation.platform == channel.platform,
        Conversation.channel_id == channel.channel_id,
        Conversation.thread_id == (channel.thread_id or ""),
    )


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


def _storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL and no UTF-8 codec takes a lone surrogate (which a JSON
    # payload's "\ud800" escape can produce): replace both rather than lose the turn.
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is None:
        raise ValueError("a naive datetime was given; storage needs an aware (UTC) datetime")
