"""Replies on Discord: one answer shown as a chain of messages of at most 2,000 characters.

Every call receives the whole text so far; the chain is re-split and only the messages whose
text changed are edited (usually the last one), so a long answer grows into further messages
while it streams. Every send and edit passes ``AllowedMentions.none()``: model output can never
ping ``@everyone``, ``@here``, a role or a user, and a reply never pings its author.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import aiohttp
import discord

from adapters.text import split_message
from bot.events import DeliveryError

log = logging.getLogger(__name__)

MESSAGE_LIMIT: Final = 2000
NO_MENTIONS: Final = discord.AllowedMentions.none()
PLACEHOLDER: Final = "…"  # Discord rejects empty messages; shown until the first text arrives
# Discord's path name for an interaction's first response. discord.py formats a message id into
# the URL as given, so the name stands in for the (unknown) id of the deferred response.
ORIGINAL: Final = cast(int, "@original")
# An interaction that can no longer be answered: its token expired (not deferred within 3 seconds)
# or it was answered already.
UNKNOWN_INTERACTION: Final = 10062
ALREADY_ACKNOWLEDGED: Final = 40060
EXPIRED_INTERACTION: Final = "the Discord interaction has expired"


def delivery_error(exc: Exception) -> DeliveryError:
    """A failed send or edit, as the core's retry policy sees it."""
    if isinstance(exc, discord.HTTPException):
        transient = exc.status >= 500 or exc.status == 429
        return DeliveryError(
            f"Discord answered HTTP {exc.status} ({exc.text or 'no detail'})", transient=transient
        )
    return DeliveryError(f"no response from Discord: {type(exc).__name__}", transient=True)


RETRYABLE = (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError)


def unanswerable(error: BaseException) -> bool:
    """A replayed interaction (already responded to) or one whose token has expired."""
    if isinstance(error, discord.InteractionResponded):
        return True
    return isinstance(error, discord.HTTPException) and error.code in (
        UNKNOWN_INTERACTION,
        ALREADY_ACKNOWLEDGED,
    )


class DiscordReply(ABC):
    """The ``ReplyHandle`` logic shared by interaction and mention replies. ``message_ids`` are the
    messages an earlier run showed the answer in (from its ``handle``): they are edited again."""

    def __init__(self, message_ids: list[int], shown: list[str]) -> None:
        self._ids = message_ids  # the chain's messages, in order
        self._shown = shown  # what each of them currently says ("" where unknown)
        self._text = ""  # the newest text the core gave
        self.ended = False  # finish() or fail() delivered

    @property
    def handle(self) -> dict[str, Any] | None:
        return {**self._where(), "ids": [str(message_id) for message_id in self._ids]}

    async def accept(self) -> None:
        return None

    async def begin(self) -> None:
        if not self._ids:
            await self._append(PLACEHOLDER)

    async def update(self, text: str) -> None:
        if self.ended or not text.strip():
            return
        self._text = text
        try:
            await self._show(text)
        except RETRYABLE as exc:
            # A missed edit is harmless: the next update or finish() shows the whole text again.
            log.warning("could not update a Discord reply: %s", exc)

    async def finish(self, text: str) -> None:
        self._text = text
        try:
            await self._show(text)
        except RETRYABLE as exc:
            raise delivery_error(exc) from None
        self.ended = True

    async def fail(self, reason: str) -> None:
        note = f"⚠️ {reason}"
        try:
            await self._show(f"{self._text.rstrip()}\n\n{note}" if self._text.strip() else note)
        except RETRYABLE as exc:
            raise delivery_error(exc) from None
        self.ended = True

    async def withdraw(self) -> None:
        """The core chose not to answer (ignored): remove what this reply posted."""
        while self._ids and not self.ended:
            try:
                await self._delete(self._ids[-1])
            except RETRYABLE as exc:
                log.warning("could not remove an unanswered Discord reply: %s", exc)
                return
            self._ids.pop()
            self._shown.pop()

    async def _show(self, text: str) -> None:
        parts = split_message(text, MESSAGE_LIMIT) or [PLACEHOLDER]
        for index, part in enumerate(parts):
            if index == len(self._ids):
                await self._append(part)
            elif self._shown[index] != part:
                await self._edit(self._ids[index], part)
                self._shown[index] = part
        while len(self._ids) > len(parts):  # the text got shorter (a note, or a resumed answer)
            with contextlib.suppress(discord.NotFound):  # already gone is as good as deleted
                await self._delete(self._ids[-1])
            self._ids.pop()
            self._shown.pop()

    async def _append(self, content: str) -> None:
        self._ids.append(await self._send(content))
        self._shown.append(content)

    @abstractmethod
    def _where(self) -> dict[str, Any]: ...

    @abstractmethod
    async def _send(self, content: str) -> int: ...

    @abstractmethod
    async def _edit(self, message_id: int, content: str) -> None: ...

    @abstractmethod
    async def _delete(self, message_id: int) -> None: ...


class InteractionReply(DiscordReply):
    """A slash command's answer: the deferred response, then follow-ups, all through the
    interaction's webhook token (valid 15 minutes, independent of the gateway connection).

    ``defer`` answers the interaction (Discord's 3-second limit): ``accept`` calls it right after
    the core has recorded the command. A reply rebuilt after a restart has none: it was deferred."""

    def __init__(
        self,
        webhook: discord.Webhook,
        *,
        ephemeral: bool = False,
        defer: Callable[[], Awaitable[Any]] | None = None,
        where: dict[str, Any] | None = None,
        message_ids: list[int] | None = None,
        interaction_id: str = "?",
    ) -> None:
        ids = message_ids or [ORIGINAL]
        super().__init__(ids, [""] * len(ids))
        self._id = interaction_id  # for the log
        self._expired = False
        self._webhook = webhook
        self._ephemeral = ephemeral
        self._defer = defer
        self._where_ = where or {}

    def _where(self) -> dict[str, Any]:
        return {"kind": "interaction", **self._where_}

    async def accept(self) -> None:
        if self._defer is not None:
            defer, self._defer = self._defer, None
            try:
                await defer()
            except (discord.InteractionResponded, discord.HTTPException) as exc:
                if not unanswerable(exc):
                    raise
                # Discord has told the user the application did not respond; nothing can be shown.
                log.warning("Discord: interaction %s was already answered or has expired (%s)", self._id, exc)
                self._expired = True

    async def begin(self) -> None:
        """The deferred response is the placeholder."""

    async def update(self, text: str) -> None:
        if not self._expired:
            await super().update(text)

    async def finish(self, text: str) -> None:
        if self._expired:
            raise DeliveryError(EXPIRED_INTERACTION, transient=False)
        await super().finish(text)

    async def fail(self, reason: str) -> None:
        if self._expired:  # no note can reach the user either: the warning above is all there is
            self.ended = True
            return
        await super().fail(reason)

    async def _send(self, content: str) -> int:
        message = await self._webhook.send(
            content, wait=True, ephemeral=self._ephemeral, allowed_mentions=NO_MENTIONS
        )
        return message.id

    async def _edit(self, message_id: int, content: str) -> None:
        await self._webhook.edit_message(message_id, content=content, allowed_mentions=NO_MENTIONS)

    async def _delete(self, message_id: int) -> None:
        await self._webhook.delete_message(message_id)


class MessageReply(DiscordReply):
    """The answer to a mention or DM: replies to the user's message, edited as text streams.
    Without ``message_id`` (a slash command whose token expired) it is a plain channel message
    whose first part starts with ``quote``."""

    def __init__(
        self,
        channel: discord.PartialMessageable,
        message_id: int | None,
        *,
        message_ids: list[int] | None = None,
        quote: str = "",
        nonce: str | None = None,
    ) -> None:
        """``nonce`` (the event id) makes each part's first send idempotent (Discord's
        ``enforce_nonce``): a run that died before storing a message id sends it again and gets the
        same message back."""
        ids = message_ids or []
        super().__init__(ids, [""] * len(ids))
        self._channel = channel
        self._message_id = message_id
        self._quote = quote
        self._nonce = nonce
        self._reference = (
            discord.MessageReference(message_id=message_id, channel_id=channel.id, fail_if_not_exists=False)
            if message_id is not None
            else None
        )

    def _where(self) -> dict[str, Any]:
        return {"kind": "message", "channel_id": str(self._channel.id)}

    async def accept(self) -> None:
        """A fresh mention or DM: "<bot> is typing…" at once (Discord shows it for up to 10 s), so
        the asker sees it was heard while earlier messages of the conversation are answered."""
        if self._message_id is None or self._ids:
            return
        try:
            await self._channel.typing()
        except RETRYABLE as exc:  # only a courtesy: the placeholder follows when its turn comes
            log.info("could not show Discord's typing indicator: %s", exc)

    async def _show(self, text: str) -> None:
        await super()._show(f"{self._quote}{text}" if self._quote else text)

    async def _send(self, content: str) -> int:
        # At most 25 characters: a snowflake (19 digits) and the part's index.
        extra: dict[str, Any] = {"nonce": f"{self._nonce}.{len(self._ids)}"[-25:]} if self._nonce else {}
        if self._reference is not None:
            extra["reference"] = self._reference
        message = await self._channel.send(content, allowed_mentions=NO_MENTIONS, **extra)
        return message.id

    async def _edit(self, message_id: int, content: str) -> None:
        await self._channel.get_partial_message(message_id).edit(
            content=content, allowed_mentions=NO_MENTIONS
        )

    async def _delete(self, message_id: int) -> None:
        await self._channel.get_partial_message(message_id).delete()
