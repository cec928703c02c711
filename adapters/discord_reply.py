"""Replies on Discord: one answer shown as a chain of messages of at most 2,000 characters.

Every call receives the whole text so far; the chain is re-split and only the messages whose
text changed are edited (usually the last one), so a long answer grows into further messages
while it streams. Every send and edit passes ``AllowedMentions.none()``: model output can never
ping ``@everyone``, ``@here``, a role or a user, and a reply never pings its author.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Final, cast

import discord

from adapters.text import split_message

log = logging.getLogger(__name__)

MESSAGE_LIMIT: Final = 2000
NO_MENTIONS: Final = discord.AllowedMentions.none()
PLACEHOLDER: Final = "…"  # Discord rejects empty messages; shown until the first text arrives
# Discord's path name for an interaction's first response. discord.py formats a message id into
# the URL as given, so the name stands in for the (unknown) id of the deferred response.
ORIGINAL: Final = cast(int, "@original")


class DiscordReply(ABC):
    """The ``ReplyHandle`` logic shared by interaction and mention replies."""

    def __init__(self, message_ids: list[int], shown: list[str]) -> None:
        self._ids = message_ids  # the chain's messages, in order
        self._shown = shown  # what each of them currently says
        self._text = ""  # the newest text the core gave
        self.ended = False  # finish() or fail() delivered

    async def begin(self) -> None:
        if not self._ids:
            await self._append(PLACEHOLDER)

    async def update(self, text: str) -> None:
        if self.ended or not text.strip():
            return
        self._text = text
        try:
            await self._show(text)
        except discord.HTTPException as exc:
            # A missed edit is harmless: the next update or finish() shows the whole text again.
            log.warning("could not update a Discord reply: %s", exc)

    async def finish(self, text: str) -> None:
        self._text = text
        await self._show(text)
        self.ended = True

    async def fail(self, reason: str) -> None:
        note = f"⚠️ {reason}"
        await self._show(f"{self._text.rstrip()}\n\n{note}" if self._text.strip() else note)
        self.ended = True

    async def withdraw(self) -> None:
        """The core chose not to answer (ignored, duplicate): remove what this reply posted."""
        while self._ids and not self.ended:
            try:
                await self._delete(self._ids[-1])
            except discord.HTTPException as exc:
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
        while len(self._ids) > len(parts):  # the text got shorter (a failure note replaced it)
            await self._delete(self._ids[-1])
            self._ids.pop()
            self._shown.pop()

    async def _append(self, content: str) -> None:
        self._ids.append(await self._send(content))
        self._shown.append(content)

    @abstractmethod
    async def _send(self, content: str) -> int: ...

    @abstractmethod
    async def _edit(self, message_id: int, content: str) -> None: ...

    @abstractmethod
    async def _delete(self, message_id: int) -> None: ...


class InteractionReply(DiscordReply):
    """A slash command's answer: the deferred response, then follow-ups, all through the
    interaction's webhook token (valid 15 minutes, independent of the gateway connection)."""

    def __init__(self, webhook: discord.Webhook, *, ephemeral: bool = False) -> None:
        # The adapter deferred on receipt, so the first message exists and shows "thinking…".
        super().__init__([ORIGINAL], [""])
        self._webhook = webhook
        self._ephemeral = ephemeral

    async def begin(self) -> None:
        """The deferred response is the placeholder."""

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
    """The answer to a mention or DM: replies to the user's message, edited as text streams."""

    def __init__(self, channel: discord.PartialMessageable, message_id: int) -> None:
        super().__init__([], [])
        self._channel = channel
        self._reference = discord.MessageReference(
            message_id=message_id, channel_id=channel.id, fail_if_not_exists=False
        )

    async def _send(self, content: str) -> int:
        message = await self._channel.send(content, reference=self._reference, allowed_mentions=NO_MENTIONS)
        return message.id

    async def _edit(self, message_id: int, content: str) -> None:
        await self._channel.get_partial_message(message_id).edit(
            content=content, allowed_mentions=NO_MENTIONS
        )

    async def _delete(self, message_id: int) -> None:
        await self._channel.get_partial_message(message_id).delete()
