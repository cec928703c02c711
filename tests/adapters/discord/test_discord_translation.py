"""Pure pieces of the Discord adapter: mention stripping and the message chain."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import aiohttp
import discord
import pytest

from adapters.discord_events import strip_mention
from adapters.discord_reply import PLACEHOLDER, DiscordReply


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("<@42> what is up?", "what is up?"),
        ("hey <@!42> there", "hey there"),
        ("<@42>\nfirst line\nsecond", "first line\nsecond"),
        ("<@43> is not me", "<@43> is not me"),
        ("<@&7> via the role", "via the role"),
        ("<@42>", ""),
    ],
)
def test_strip_mention(content: str, expected: str) -> None:
    assert strip_mention(content, 42, role_id=7) == expected


class RecordingReply(DiscordReply):
    """A chain over an in-memory channel; ``broken_edits`` makes that many edits fail first."""

    def __init__(self, broken_edits: int = 0) -> None:
        super().__init__([], [])
        self.messages: dict[int, str] = {}
        self.ops: list[str] = []
        self.broken_edits = broken_edits

    async def _send(self, content: str) -> int:
        message_id = len(self.messages) + 1
        self.messages[message_id] = content
        self.ops.append(f"send {message_id}")
        return message_id

    async def _edit(self, message_id: int, content: str) -> None:
        if self.broken_edits:
            self.broken_edits -= 1
            # HTTPException reads only the response's status and reason.
            response = cast(aiohttp.ClientResponse, SimpleNamespace(status=503, reason="Service Unavailable"))
            raise discord.HTTPException(response, "down")
        self.messages[message_id] = content
        self.ops.append(f"edit {message_id}")

    async def _delete(self, message_id: int) -> None:
        del self.messages[message_id]
        self.ops.append(f"delete {message_id}")


async def test_only_changed_messages_are_edited_as_the_text_grows() -> None:
    reply = RecordingReply()
    await reply.begin()
    first = "a" * 1500
    await reply.update(first)
    await reply.update(first + "\n\n" + "b" * 1000)  # now two messages
    await reply.finish(first + "\n\n" + "b" * 1200)
    assert reply.ops == ["send 1", "edit 1", "send 2", "edit 2"]
    assert reply.messages == {1: first, 2: "b" * 1200}
    assert reply.ended


async def test_a_shorter_final_text_removes_the_extra_messages() -> None:
    reply = RecordingReply()
    await reply.begin()
    await reply.update("x " * 2500)
    assert len(reply.messages) == 3
    await reply.finish("short")
    assert reply.messages == {1: "short"}


async def test_a_failed_update_is_retried_by_the_next_call() -> None:
    reply = RecordingReply(broken_edits=1)
    await reply.begin()
    await reply.update("partial")  # the edit fails: logged, not raised
    assert reply.messages == {1: PLACEHOLDER}
    await reply.finish("partial and final")
    assert reply.messages == {1: "partial and final"}


async def test_blank_updates_are_skipped() -> None:
    reply = RecordingReply()
    await reply.begin()
    await reply.update("   \n")
    assert reply.ops == ["send 1"]


async def test_fail_keeps_the_text_so_far_and_adds_the_reason() -> None:
    reply = RecordingReply()
    await reply.begin()
    await reply.update("half an answer")
    await reply.fail("The answer took too long.")
    assert reply.messages == {1: "half an answer\n\n⚠️ The answer took too long."}
    assert reply.ended


async def test_fail_before_begin_posts_the_note() -> None:
    reply = RecordingReply()
    await reply.fail("busy")
    assert reply.messages == {1: "⚠️ busy"}


async def test_withdraw_removes_an_unanswered_placeholder_but_not_an_answer() -> None:
    unanswered = RecordingReply()
    await unanswered.begin()
    await unanswered.withdraw()
    assert unanswered.messages == {}

    answered = RecordingReply()
    await answered.finish("done")
    await answered.withdraw()
    assert answered.messages == {1: "done"}
