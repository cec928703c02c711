"""Slack payloads -> neutral ``IncomingMessage``: which events count as user text, and what the
model should read of them.

Pure functions, no I/O, so each rule is tested on its own. Messages are built with the names
known so far (ids, or ``names`` when given); ``raw["source_text"]`` keeps Slack's markup so the
adapter can redo the text with looked-up names (``users.info``) once the core has recorded it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypedDict

from bot.events import ChannelRef, Command, IncomingMessage

PLATFORM = "slack"
EVENTS_PATH = "/slack/events"  # the HTTP mode's Request URL path (events and the slash command)
# Subtypes that still carry a user's new text; every other subtype (edits, deletions, joins,
# bot messages, ...) is not a message to answer.
_USER_TEXT_SUBTYPES = frozenset({"file_share", "thread_broadcast"})
_USER_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_CHANNEL_LINK = re.compile(r"<#([CG][A-Z0-9]+)(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!([a-z]+)(?:\^[A-Z0-9]+)?(?:\|([^>]*))?>")
_LINK = re.compile(r"<((?:https?|mailto):[^|>]+)(?:\|([^>]*))?>")


class SlackRaw(TypedDict, total=False):
    """``IncomingMessage.raw`` for Slack: what answering (again, after a restart) needs."""

    channel: str
    thread_ts: str | None  # the thread answered in; None at a DM's top level
    ts: str  # the question's own ts (events), so deleting it cancels the answer
    ephemeral: bool  # a slash command answered through its response_url (never resumed)
    source_text: str  # the text with Slack's markup, redone with names once they are looked up


def mentioned_users(text: str) -> set[str]:
    """The user ids mentioned in ``text`` (Slack markup ``<@U123>``)."""
    return {match.group(1) for match in _USER_MENTION.finditer(text)}


def slack_markup_to_text(text: str, bot_user_id: str, names: Mapping[str, str]) -> str:
    """What the model reads: the bot's own mention removed, other mentions and links as plain
    text, and Slack's ``&amp; &lt; &gt;`` escapes undone."""

    def user(match: re.Match[str]) -> str:
        user_id, label = match.group(1), match.group(2)
        if user_id == bot_user_id:
            return ""
        return "@" + (names.get(user_id) or label or user_id)

    text = _USER_MENTION.sub(user, text)
    text = _CHANNEL_LINK.sub(lambda m: "#" + (m.group(2) or m.group(1)), text)
    text = _SPECIAL.sub(lambda m: m.group(2) or "@" + m.group(1), text)
    text = _LINK.sub(lambda m: m.group(1) if not m.group(2) else f"{m.group(2)} ({m.group(1)})", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return html.unescape(text).strip()


def is_user_text(event: Mapping[str, Any], bot_user_id: str) -> bool:
    """Whether ``event`` is new text written by a person other than this bot."""
    if event.get("bot_id") or event.get("bot_profile"):
        return False
    if event.get("subtype") is not None and event.get("subtype") not in _USER_TEXT_SUBTYPES:
        return False
    user = event.get("user")
    return isinstance(user, str) and bool(user) and user != bot_user_id


def deleted_message(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(channel, ts) of the user message a ``message_deleted`` event removes, else None."""
    event = body.get("event")
    if not isinstance(event, Mapping) or event.get("subtype") != "message_deleted":
        return None
    channel, ts = event.get("channel"), event.get("deleted_ts")
    return (channel, ts) if isinstance(channel, str) and isinstance(ts, str) else None


def to_message(
    body: Mapping[str, Any],
    bot_user_id: str,
    names: Mapping[str, str],
    *,
    thread_followups: bool,
) -> IncomingMessage | None:
    """The message an Events API envelope carries, or None if it is not one to hand the core.

    - ``app_mention`` in a channel: answered in the thread of the mention (a new thread at the
      top level, the existing one inside a thread); the thread is the conversation.
    - ``message`` in a DM: one conversation per DM, answered at the top level; a thread inside
      a DM is its own conversation.
    - ``message`` inside a channel thread without a mention: a follow-up, answered only if the
      core already has that conversation (``followup_only``). A message that mentions the bot
      also arrives as ``app_mention``, so the ``message`` copy is dropped.
    """
    event = body.get("event")
    event_id = body.get("event_id")
    if not isinstance(event, Mapping) or not isinstance(event_id, str) or not event_id:
        return None
    if not is_user_text(event, bot_user_id):
        return None
    channel, ts, text = event.get("channel"), event.get("ts"), event.get("text")
    if not (isinstance(channel, str) and channel and isinstance(ts, str) and ts and isinstance(text, str)):
        return None
    thread_ts = event.get("thread_ts") if isinstance(event.get("thread_ts"), str) else None
    is_direct = event.get("channel_type") == "im" or channel.startswith("D")
    mentions_bot = bot_user_id in mentioned_users(text)
    followup_only = False

    if event.get("type") == "app_mention":
        if is_direct:
            return None  # DMs are handled as `message` events, which also carry mentions
        conversation_ts: str | None = thread_ts or ts
    elif event.get("type") == "message":
        if is_direct:
            conversation_ts = thread_ts
        elif thread_ts and thread_ts != ts and thread_followups and not mentions_bot:
            conversation_ts, followup_only = thread_ts, True
        else:
            return None  # a channel message: only mentions and thread follow-ups are for the bot
    else:
        return None

    user = str(event["user"])
    raw: SlackRaw = {"channel": channel, "thread_ts": conversation_ts, "ts": ts, "source_text": text}
    return IncomingMessage(
        event_id=event_id,
        channel=ChannelRef(PLATFORM, channel, conversation_ts),
        author_id=user,
        author_name=names.get(user, user),
        text=slack_markup_to_text(text, bot_user_id, names),
        is_direct=is_direct,
        received_at=_timestamp(ts),
        raw=raw,
        followup_only=followup_only,
    )


def parse_command(text: str) -> tuple[Command, str]:
    """``/chatglm reset`` / ``help`` / anything else (a prompt) -> (command, prompt)."""
    stripped = text.strip()
    verb = stripped.split(maxsplit=1)[0].lower() if stripped else ""
    if verb == "reset":
        return Command.RESET, ""
    if verb in ("help", ""):
        return Command.HELP, ""
    return Command.CHAT, stripped


def command_message(
    body: Mapping[str, Any],
    command: Command,
    text: str,
    conversation_ts: str | None,
    names: Mapping[str, str] | None = None,
) -> IncomingMessage | None:
    """The message a ``/chatglm`` slash command carries (Slack never retries these; the
    ``trigger_id`` is unique per invocation), or None if the payload lacks what is needed."""
    channel, user, trigger = body.get("channel_id"), body.get("user_id"), body.get("trigger_id")
    if not (isinstance(channel, str) and channel and isinstance(user, str) and user):
        return None
    if not (isinstance(trigger, str) and trigger):
        return None
    names = names or {}
    raw: SlackRaw = {
        "channel": channel,
        "thread_ts": conversation_ts,
        "ephemeral": command != Command.CHAT,
        "source_text": text,
    }
    return IncomingMessage(
        event_id=f"command:{trigger}",
        channel=ChannelRef(PLATFORM, channel, conversation_ts),
        author_id=user,
        author_name=names.get(user, user),
        text=slack_markup_to_text(text, "", names),
        is_direct=channel.startswith("D"),
        raw=raw,
        command=command,
    )


def _timestamp(ts: str) -> datetime:
    try:
        return datetime.fromtimestamp(float(ts), UTC)
    except (ValueError, OverflowError, OSError):
        return datetime.now(UTC)
