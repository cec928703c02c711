"""Translation of Discord interactions and messages into neutral ``IncomingMessage`` objects.

A Discord thread is a channel of its own with a parent; the conversation key keeps the parent as
``channel_id`` (so channel allowlists apply to its threads) and the thread as ``thread_id``.
``raw`` holds what is needed to answer again after a restart (see ``DiscordAdapter.reply_for``).
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypedDict

import discord

from bot.events import ChannelRef, Command, IncomingMessage

PLATFORM = "discord"

# Message types a person writes; everything else (joins, pins, boosts, ...) is a system message.
_USER_MESSAGE_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})


class MessageRaw(TypedDict):
    """``IncomingMessage.raw`` of a mention or DM: where to reply."""

    kind: Literal["message"]
    channel_id: str
    message_id: str


class InteractionRaw(TypedDict):
    """``IncomingMessage.raw`` of a slash command: its webhook (15 minutes), then its channel."""

    kind: Literal["interaction"]
    application_id: str
    token: str
    ephemeral: bool
    channel_id: str


def channel_ref(channel_id: int, channel: object) -> ChannelRef:
    """The conversation key for a message or command in ``channel`` (id ``channel_id``)."""
    if isinstance(channel, discord.Thread) and channel.parent_id is not None:
        return ChannelRef(PLATFORM, str(channel.parent_id), str(channel.id))
    return ChannelRef(PLATFORM, str(channel_id))


def from_interaction(interaction: discord.Interaction[Any], command: Command, text: str) -> IncomingMessage:
    """A slash command: the event id is the interaction id, so a redelivery is a duplicate."""
    assert interaction.channel_id is not None  # slash commands always run in a channel
    user = interaction.user
    raw: InteractionRaw = {
        "kind": "interaction",
        "application_id": str(interaction.application_id),
        # Valid for 15 minutes; lets a restarted bot still finish the deferred response.
        "token": interaction.token,
        "ephemeral": command is Command.HELP,
        # Where a channel message goes instead once the token has expired.
        "channel_id": str(interaction.channel_id),
    }
    return IncomingMessage(
        event_id=str(interaction.id),
        channel=channel_ref(interaction.channel_id, interaction.channel),
        author_id=str(user.id),
        author_name=user.display_name,
        text=text,
        is_direct=interaction.guild_id is None,
        raw=raw,
        command=command,
    )


def addressed_to(message: discord.Message, me: discord.ClientUser) -> bool:
    """Whether the bot should answer ``message``: a DM, or a guild message that mentions it."""
    if message.author.bot or message.author.id == me.id or message.type not in _USER_MESSAGE_TYPES:
        return False
    if message.guild is None:
        return True
    # Only a direct mention counts: @everyone / @here must not wake the bot in every channel.
    if any(user.id == me.id for user in message.mentions):
        return True
    own_role = message.guild.self_role
    return own_role is not None and own_role in message.role_mentions


def strip_mention(content: str, me_id: int, role_id: int | None = None) -> str:
    """The prompt: ``content`` without the bot's own user (or managed role) mention."""
    pattern = rf"<@!?{me_id}>" if role_id is None else rf"<@!?{me_id}>|<@&{role_id}>"
    return re.sub(rf"(?:{pattern})[ \t]*", "", content).strip()


def from_message(message: discord.Message, me: discord.ClientUser, *, may_reset: bool) -> IncomingMessage:
    """A mention or DM: the core reads a ``reset`` / ``help`` from the text itself, and refuses the
    reset unless ``may_reset``."""
    own_role = message.guild.self_role if message.guild is not None else None
    raw: MessageRaw = {
        "kind": "message",
        "channel_id": str(message.channel.id),
        "message_id": str(message.id),
    }
    return IncomingMessage(
        event_id=str(message.id),
        channel=channel_ref(message.channel.id, message.channel),
        author_id=str(message.author.id),
        author_name=message.author.display_name,
        text=strip_mention(message.content, me.id, own_role.id if own_role else None),
        is_direct=message.guild is None,
        raw=raw,
        may_reset=may_reset,
    )
