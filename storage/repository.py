"""The storage API the core uses: event dedupe and recovery, conversation history. All SQL lives here."""

from __future__ import annotations

import asyncio
import enum
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from alembic.util import CommandError
from sqlalchemy import CursorResult, Result, Select, delete, exists, select, update
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from bot.config import ConfigError
from bot.events import ChannelRef
from storage.db import SQLITE_IMMEDIATE, create_engine, normalize_url
from storage.migrate import upgrade_to_head
from storage.models import Conversation, Message, ProcessedEvent, utcnow


class ClaimResult(enum.StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    TAKEOVER = "takeover"  # a crashed earlier process claimed it and never answered; now it is ours


class EventStatus(enum.StrEnum):
    RECEIVED = "received"
    ANSWERED = "answered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StoredTurn:
    user: str
    assistant: str
    user_tokens: int
    assistant_tokens: int
    created_at: datetime


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
    """One process's handle on the database. ``instance_id`` marks the events this process
    claimed, so that after a restart the new process can tell which ones were left unanswered."""

    def __init__(self, engine: AsyncEngine, instance_id: str) -> None:
        self.instance_id = instance_id
        self.started_at = utcnow()
        self._engine = engine
        self._dialect = engine.dialect.name
        self._reads = async_sessionmaker(engine, expire_on_commit=False)
        writer = engine.execution_options(**{SQLITE_IMMEDIATE: True})
        self._writes = async_sessionmaker(writer, expire_on_commit=False)
        self._pending: set[asyncio.Future[Any]] = set()
        self.location = engine.url.render_as_string(hide_password=True)  # for logs: no password

    @classmethod
    async def open(cls, url: str, *, instance_id: str | None = None, data_dir: Path | None = None) -> Storage:
        """Connect to ``url`` (see ``storage.db.normalize_url``, with ``data_dir`` the base of a
        relative SQLite path) and migrate it to the newest schema."""
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
        return cls(engine, instance_id or uuid.uuid4().hex)

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

    # -- events ---------------------------------------------------------------------------------

    @_uncancellable
    async def claim_event(self, platform: str, event_id: str, payload: dict[str, Any]) -> ClaimResult:
        """Record a platform event before answering it; only a NEW or TAKEOVER claim should be answered.

        TAKEOVER: the event was claimed, before this process started, by another process that never
        answered it (it crashed); the claim is now this process's."""
        now = utcnow()
        key = (ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
        async with self._write() as session:
            insert = self._insert(ProcessedEvent).values(
                platform=platform,
                event_id=event_id,
                status=EventStatus.RECEIVED.value,
                owner=self.instance_id,
                payload=payload,
                received_at=now,
                updated_at=now,
            )
            claimed = await session.scalar(
                insert.on_conflict_do_nothing(index_elements=["platform", "event_id"]).returning(
                    ProcessedEvent.id
                )
            )
            if claimed is not None:
                return ClaimResult.NEW
            existing = (
                await session.execute(
                    select(ProcessedEvent.status, ProcessedEvent.owner, ProcessedEvent.updated_at).where(*key)
                )
            ).one_or_none()
            if (
                existing is None
                or existing.status != EventStatus.RECEIVED
                or existing.owner == self.instance_id
                # Claimed since this process started: its owner is alive (a peer, or a process that
                # just took it over), not the crashed predecessor. Without this two live processes
                # would keep taking a re-delivered event from each other and both answer it.
                or existing.updated_at >= self.started_at
            ):
                return ClaimResult.DUPLICATE
            # Conditional on the old owner: of several restarted processes only one wins.
            taken = await session.execute(
                update(ProcessedEvent)
                .where(
                    *key,
                    ProcessedEvent.owner == existing.owner,
                    ProcessedEvent.status == EventStatus.RECEIVED,
                )
                .values(owner=self.instance_id, updated_at=now)
            )
            return ClaimResult.TAKEOVER if _rowcount(taken) == 1 else ClaimResult.DUPLICATE

    @_uncancellable
    async def mark_event(self, platform: str, event_id: str, status: EventStatus) -> None:
        async with self._write() as session:
            await session.execute(
                update(ProcessedEvent)
                .where(ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
                .values(status=status.value, updated_at=utcnow())
            )

    @_uncancellable
    async def unanswered_events(self, since: datetime) -> list[dict[str, Any]]:
        """Payloads of events that other processes claimed at or after ``since`` and never
        finished, oldest first: what a restarted process should answer."""
        _require_aware(since)
        async with self._read() as session:
            payloads = await session.scalars(
                select(ProcessedEvent.payload)
                .where(
                    ProcessedEvent.status == EventStatus.RECEIVED,
                    ProcessedEvent.owner != self.instance_id,
                    ProcessedEvent.received_at >= since,
                )
                .order_by(ProcessedEvent.received_at, ProcessedEvent.id)
            )
            return list(payloads)

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
        event: tuple[str, str] | None = None,
    ) -> None:
        """Store one question and its answer, and mark ``event`` (platform, event_id) answered:
        all in one transaction, so a crash never leaves half a turn or an answered-but-unmarked event."""
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
                platform, event_id = event
                await session.execute(
                    update(ProcessedEvent)
                    .where(ProcessedEvent.platform == platform, ProcessedEvent.event_id == event_id)
                    .values(status=EventStatus.ANSWERED.value, updated_at=now)
                )

    @_uncancellable
    async def clear(self, channel: ChannelRef) -> int:
        """Delete the conversation's messages; returns how many were deleted."""
        async with self._write() as session:
            result = await session.execute(
                delete(Message).where(Message.conversation_id == _conversation(channel).scalar_subquery()),
                execution_options={"synchronize_session": False},
            )
            return _rowcount(result)

    # -- internals ------------------------------------------------------------------------------

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
