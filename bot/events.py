"""The neutral event model: what every adapter translates to and from.

Adapters turn a platform payload into one frozen ``IncomingMessage`` and give the core a
``ReplyHandle`` that turns neutral reply calls back into platform calls. Nothing here knows
about Slack, Discord, SQL or the model.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """The key of one conversation: a Slack thread, a Discord channel or thread, a DM, the console."""

    platform: str
    channel_id: str
    thread_id: str | None = None

    def __str__(self) -> str:
        suffix = f"/{self.thread_id}" if self.thread_id else ""
        return f"{self.platform}:{self.channel_id}{suffix}"


class Command(enum.StrEnum):
    """What a message asks of the core. Adapters map their own syntax (``/reset``) onto these."""

    CHAT = "chat"
    RESET = "reset"
    HELP = "help"


def read_command(text: str) -> Command:
    """The command a message's text asks for: a lone ``reset`` / ``help``, in any case, after
    any run of ``/`` and ``!``; anything else is a chat message."""
    word = text.strip().lower().lstrip("/!")
    if word in ("reset", "help"):
        return Command(word)
    return Command.CHAT


def _frozen_raw(raw: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(raw or {}))


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One user message, platform-neutral.

    ``command`` is None when the adapter leaves it to the core to read a leading ``reset`` /
    ``help`` from the text (mentions, DMs, console); adapters with explicit commands
    (``/ask``, ``/reset``) set it. ``followup_only`` marks a message that should be answered
    only if its conversation already has history (Slack thread follow-ups without a mention).
    """

    event_id: str
    channel: ChannelRef
    author_id: str
    author_name: str
    text: str
    is_direct: bool = False
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    raw: Mapping[str, Any] = field(default_factory=lambda: _frozen_raw(None))
    command: Command | None = None
    followup_only: bool = False
    may_reset: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.raw, MappingProxyType):
            object.__setattr__(self, "raw", _frozen_raw(self.raw))


class ReplyHandle(Protocol):
    """Where one answer goes. Every call receives the whole text so far, not a delta.

    ``accept`` runs right after the core has recorded the message (a slash command's defer);
    ``begin`` when the message's turn in its conversation comes and the core answers it (the
    placeholder); ``update`` carries partial text, one call at a time; ``finish`` / ``fail`` show
    the final text, raising ``DeliveryError`` when the platform did not take it (the core retries
    them on the same handle); ``withdraw`` removes what ``accept`` showed when nothing is answered.
    ``handle`` is where the reply is shown, JSON-safe (the platform's message ids): the core stores
    it, and an adapter's ``reply_for`` rebuilds the same reply from it after a restart.
    """

    @property
    def handle(self) -> dict[str, Any] | None: ...

    async def accept(self) -> None: ...

    async def begin(self) -> None: ...

    async def update(self, text: str) -> None: ...

    async def finish(self, text: str) -> None: ...

    async def fail(self, reason: str) -> None: ...

    async def withdraw(self) -> None: ...


class DeliveryError(Exception):
    """The platform did not take a final text. ``transient``: it may later (5xx, 429, the network);
    otherwise it never will (the message is gone, the bot was removed). ``retry_after``: seconds
    the platform asked for."""

    def __init__(self, reason: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after


class Outcome(enum.StrEnum):
    """What the core did with a message; adapters may use it to clean up (e.g. a deferred reply)."""

    ACCEPTED = "accepted"  # recorded; the answer follows in the background
    ANSWERED = "answered"
    COMMAND = "command"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    REFUSED = "refused"
    REJECTED = "rejected"  # bad input answered with an explanation, no model call
    FAILED = "failed"
    DEFERRED = "deferred"  # left for the next start (the bot is shutting down)


class Core(Protocol):
    """What an adapter calls: the one seam into the core."""

    @property
    def accepting(self) -> bool:
        """False while shutting down (messages handed in now are answered by the next start)."""
        ...

    async def submit(self, message: IncomingMessage, reply: ReplyHandle) -> Outcome:
        """Record ``message`` and return at once (ACCEPTED, or DUPLICATE); the answer follows in
        the background. An adapter acknowledges the platform's delivery only after this returns."""
        ...

    async def handle(self, message: IncomingMessage, reply: ReplyHandle) -> Outcome:
        """``submit``, then wait for the answer: for adapters that show one answer at a time."""
        ...

    def cancel(self, platform: str, event_id: str) -> bool:
        """The question was deleted: stop answering it. False if it is not being answered here."""
        ...

    async def remembered_turns(self, channel: ChannelRef) -> int:
        """How many turns the conversation has (the console's banner)."""
        ...


class PlatformUnreachable(ConnectionError):
    """A platform could not be reached (network, DNS, timeout): retried, unlike rejected credentials."""


class Adapter(Protocol):
    """A platform connection. It translates only: no model, no SQL."""

    platform: str

    async def start(self, core: Core) -> None:
        """Connect and begin delivering messages to ``core``; returns once running."""
        ...

    async def stop(self) -> None: ...

    def connection(self) -> str:
        """Once started: "connected", or "reconnecting" while the platform's own client
        re-establishes a dropped connection (``/healthz`` reports it)."""
        ...

    async def lost(self) -> None:
        """Once started, return when the connection has ended for good (the platform's client
        gave up reconnecting), raising why: a ConfigError when the platform refused the settings
        (the bot stops), anything else has the adapter restarted."""
        ...

    async def resolve(self, message: IncomingMessage) -> IncomingMessage:
        """``message`` with the names it mentions looked up: called after it is recorded, so no
        look-up can delay or reorder the recording."""
        ...

    def reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> ReplyHandle | None:
        """The reply for a message recovered from storage, showing in the messages ``handle``
        names (None: none posted yet; ``{}``: a placeholder may have been posted, its id unknown,
        so the reply looks for it before posting one), or None if the platform can no longer be
        answered for it."""
        ...


class BaseReply:
    """No-op defaults for the optional parts of ``ReplyHandle``."""

    @property
    def handle(self) -> dict[str, Any] | None:
        return None

    async def accept(self) -> None:
        return None

    async def withdraw(self) -> None:
        return None


def message_to_dict(message: IncomingMessage) -> dict[str, Any]:
    """A JSON-safe form, persisted with the event so a crashed answer can be redone at restart."""
    return {
        "event_id": message.event_id,
        "platform": message.channel.platform,
        "channel_id": message.channel.channel_id,
        "thread_id": message.channel.thread_id,
        "author_id": message.author_id,
        "author_name": message.author_name,
        "text": message.text,
        "is_direct": message.is_direct,
        "received_at": message.received_at.isoformat(),
        "raw": dict(message.raw),
        "command": message.command.value if message.command else None,
        "followup_only": message.followup_only,
        "may_reset": message.may_reset,
    }


def message_from_dict(data: Mapping[str, Any]) -> IncomingMessage:
    command = data.get("command")
    return IncomingMessage(
        event_id=str(data["event_id"]),
        channel=ChannelRef(str(data["platform"]), str(data["channel_id"]), data.get("thread_id")),
        author_id=str(data["author_id"]),
        author_name=str(data["author_name"]),
        text=str(data["text"]),
        is_direct=bool(data.get("is_direct", False)),
        received_at=datetime.fromisoformat(str(data["received_at"])),
        raw=data.get("raw") or {},
        command=Command(command) if command else None,
        followup_only=bool(data.get("followup_only", False)),
        may_reset=bool(data.get("may_reset", True)),
    )
