"""Pure pieces of the Discord adapter: mention stripping and the message chain."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import aiohttp
import discord
import pytest

from adapters.discord_events import strip_mention
from adapters.discord_reply import PLACEHOLDER, DiscordReply
from bot.events import DeliveryError


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


def http_error(status: int, text: str) -> discord.HTTPException:
    # HTTPException reads only the response's status and reason.
    response = cast(aiohttp.ClientResponse, SimpleNamespace(status=status, reason="reason"))
    if status == 404:
        return discord.NotFound(response, text)
    return discord.HTTPException(response, text)


class RecordingReply(DiscordReply):
    """A chain over an in-memory channel; ``broken_edits`` makes that many edits fail first."""

    def __init__(self, broken_edits: int = 0, message_ids: list[int] | None = None) -> None:
        """``message_ids``: the chain an earlier run showed (a resumed reply, as ``reply_for`` builds)."""
        ids = list(message_ids or [])
        super().__init__(ids, [""] * len(ids))
        self.messages: dict[int, str] = {message_id: "(earlier run)" for message_id in ids}
        self.ops: list[str] = []
        self.broken_edits = broken_edits

    def _where(self) -> dict[str, str]:
        return {"kind": "message", "channel_id": "9"}

    async def _send(self, content: str) -> int:
        message_id = max(self.messages, default=0) + 1
        self.messages[message_id] = content
        self.ops.append(f"send {message_id}")
        return message_id

    async def _edit(self, message_id: int, content: str) -> None:
        if self.broken_edits:
            self.broken_edits -= 1
            raise http_error(503, "down")
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


async def test_the_handle_names_the_chain_as_it_grows_and_shrinks() -> None:
    reply = RecordingReply()
    assert reply.handle == {"kind": "message", "channel_id": "9", "ids": []}
    await reply.begin()
    await reply.update("x " * 2500)
    assert reply.handle == {"kind": "message", "channel_id": "9", "ids": ["1", "2", "3"]}
    await reply.finish("short")
    assert reply.handle == {"kind": "message", "channel_id": "9", "ids": ["1"]}


async def test_a_resumed_reply_edits_the_stored_messages_and_posts_nothing_new() -> None:
    reply = RecordingReply(message_ids=[7, 8])
    await reply.begin()  # the earlier run's messages are the placeholder: nothing is sent
    await reply.update("the new")
    await reply.finish("the new answer")
    assert reply.ops == ["edit 7", "delete 8", "edit 7"]  # no send: the same messages
    assert reply.messages == {7: "the new answer"}
    assert reply.handle == {"kind": "message", "channel_id": "9", "ids": ["7"]}


async def test_a_resumed_reply_whose_extra_message_is_already_gone_still_finishes() -> None:
    class Gone(RecordingReply):
        async def _delete(self, message_id: int) -> None:
            raise http_error(404, "Unknown Message")

    reply = Gone(message_ids=[7, 8])
    await reply.finish("short")
    assert reply.ended and reply.handle is not None and reply.handle["ids"] == ["7"]


@pytest.mark.parametrize(
    ("status", "transient"), [(500, True), (502, True), (503, True), (429, True), (404, False), (403, False)]
)
async def test_a_refused_final_text_raises_a_delivery_error_transient_only_for_5xx_and_429(
    status: int, transient: bool
) -> None:
    class Refusing(RecordingReply):
        async def _edit(self, message_id: int, content: str) -> None:
            raise http_error(status, "refused")

    reply = Refusing()
    await reply.begin()
    with pytest.raises(DeliveryError) as finished:
        await reply.finish("the answer")
    assert finished.value.transient is transient
    assert f"HTTP {status}" in finished.value.reason
    assert not reply.ended
    with pytest.raises(DeliveryError) as failed:
        await reply.fail("a note")
    assert failed.value.transient is transient


async def test_no_response_from_discord_is_a_transient_delivery_error() -> None:
    class Unreachable(RecordingReply):
        async def _send(self, content: str) -> int:
            raise aiohttp.ClientConnectionError("reset by peer")

    with pytest.raises(DeliveryError, match="no response from Discord: ClientConnectionError") as error:
        await Unreachable().finish("the answer")
    assert error.value.transient
