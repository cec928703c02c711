"""Connection life: start-up errors, intents, heartbeats, reconnects and answering after a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import discord
import pytest

from adapters.discord_adapter import DiscordAdapter
from adapters.discord_reply import MessageReply
from bot.config import ConfigError
from bot.events import ChannelRef, IncomingMessage, PlatformUnreachable
from tests.adapters.discord.conftest import StartRunning, discord_settings
from tests.adapters.discord.fake_discord import BOT_ID, MESSAGE_CONTENT_INTENT, FakeDiscord
from tests.support import ScriptedGenerator, bot_stack, start_adapter

WORDS = " ".join(f"word{i}" for i in range(50))
GUILDS, GUILD_MESSAGES, DM_MESSAGES = 1 << 0, 1 << 9, 1 << 12


async def test_a_reconnect_request_mid_generation_resumes_and_the_answer_completes(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel, other = fake.add_channel(), fake.add_channel()
    generator = ScriptedGenerator(lambda request: f"{request.query}: {WORDS}", token_delay=0.01)
    async with running(generator):
        slow = await fake.slash_command("ask", channel, options={"prompt": "slow"})
        await fake.wait_for(lambda: slow.token in fake.originals and fake.originals[slow.token].edits)
        await fake.request_reconnect()
        # Sent while the client is reconnecting: delivered once, live or replayed on RESUME.
        during = await fake.slash_command("ask", other, options={"prompt": "during"})
        await fake.wait_for(lambda: fake.resumes)
        await fake.wait_for(lambda: fake.answer_text(slow.token) == f"slow: {WORDS}")
        await fake.wait_for(lambda: fake.answer_text(during.token) == f"during: {WORDS}")
        after = await fake.slash_command("ask", other, options={"prompt": "after"})
        await fake.wait_for(lambda: fake.answer_text(after.token) == f"after: {WORDS}")

    assert len(fake.identifies) == 1  # resumed, not a new session
    assert fake.resumes[0]["session_id"] == fake.session_id
    assert [request.query for request in generator.requests] == ["slow", "during", "after"]
    assert len([call for call in fake.calls if call.path.endswith("/callback")]) == 3


async def test_heartbeats_keep_flowing_while_the_model_generates(
    fake: FakeDiscord, running: StartRunning
) -> None:
    fake.heartbeat_interval_ms = 50
    channel = fake.add_channel()
    generator = ScriptedGenerator(lambda request: WORDS, token_delay=0.02)  # about one second
    async with running(generator):
        interaction = await fake.slash_command("ask", channel, options={"prompt": "beat"})
        await fake.wait_for(
            lambda: interaction.token in fake.originals and fake.originals[interaction.token].edits
        )
        before = fake.heartbeats
        await fake.wait_for(lambda: fake.answer_text(interaction.token) == WORDS)
        during = fake.heartbeats - before
    assert during >= 3, f"only {during} heartbeats during generation"


@pytest.mark.parametrize("message_content", [False, True])
async def test_intents_ask_for_message_content_only_when_configured(
    fake: FakeDiscord, running: StartRunning, message_content: bool
) -> None:
    async with running(discord_message_content=message_content):
        pass
    [identify] = fake.identifies
    intents = identify["intents"]
    assert intents & (GUILDS | GUILD_MESSAGES | DM_MESSAGES) == GUILDS | GUILD_MESSAGES | DM_MESSAGES
    assert bool(intents & MESSAGE_CONTENT_INTENT) is message_content


async def test_a_refused_privileged_intent_is_a_clear_start_error(
    fake: FakeDiscord, running: StartRunning
) -> None:
    fake.message_content_allowed = False
    with pytest.raises(ConfigError, match="message content intent"):
        async with running(discord_message_content=True):
            pass


async def test_a_rejected_token_is_a_clear_start_error_without_the_token(
    fake: FakeDiscord, running: StartRunning
) -> None:
    fake.token = "the-real-token"
    with pytest.raises(ConfigError, match="rejected DISCORD_BOT_TOKEN") as error:
        async with running():
            pass
    assert "test-bot-token" not in str(error.value)
    assert fake.identifies == []


async def test_an_unreachable_gateway_is_a_clear_start_error(fake: FakeDiscord, tmp_path: Path) -> None:
    settings = discord_settings(fake, discord_gateway_url=f"ws://127.0.0.1:{fake.port}/nowhere")
    async with bot_stack(tmp_path, **settings) as stack:
        adapter = DiscordAdapter(stack.settings, ready_timeout=1)
        with pytest.raises(PlatformUnreachable, match="cannot connect to the Discord gateway") as error:
            await start_adapter(stack.bot, adapter)
        assert "/nowhere" in str(error.value)


async def test_unanswered_messages_are_answered_after_a_restart(fake: FakeDiscord, tmp_path: Path) -> None:
    """A process stopped mid-answer leaves a command and a mention resumable, with no note: the next
    start finishes both in the messages already shown (no second defer, no second message)."""
    channel, other = fake.add_channel(), fake.add_channel()
    settings = discord_settings(fake)
    slow = ScriptedGenerator(lambda request: f"{request.query}: {WORDS} {WORDS}", token_delay=0.2)

    async with bot_stack(tmp_path, slow, **settings) as first:
        adapter = DiscordAdapter(first.settings, guild_ready_timeout=0.05)
        await start_adapter(first.bot, adapter)
        try:
            interaction = await fake.slash_command("ask", channel, options={"prompt": "before the stop"})
            # The command's answer streams first: the one inference thread takes requests in turn, so
            # the mention, sent only now, waits behind it (and neither can finish before the stop).
            await fake.wait_for(
                lambda: interaction.token in fake.originals and fake.originals[interaction.token].edits
            )
            mention = await fake.user_message(other, f"<@{BOT_ID}> also before", mentions=(BOT_ID,))
            await fake.wait_for(lambda: fake.replies_to(mention))  # its placeholder, queued behind
            await first.bot.drain(0)  # the deploy's grace is over
        finally:
            await adapter.stop()
    partial = fake.answer_text(interaction.token)
    [placeholder] = fake.replies_to(mention)
    assert partial and f"before the stop: {WORDS} {WORDS}".startswith(partial) and partial != "…"
    assert "cancelled" not in placeholder.content

    async with bot_stack(tmp_path, **settings) as second:
        adapter = DiscordAdapter(second.settings, guild_ready_timeout=0.05)
        await start_adapter(second.bot, adapter)
        try:
            assert await second.bot.start() == 2
            await fake.wait_for(lambda: fake.answer_text(interaction.token) == "Answer 1 to: before the stop")
            await fake.wait_for(
                lambda: [r.content for r in fake.replies_to(mention)] == ["Answer 1 to: also before"]
            )
        finally:
            await adapter.stop()
    assert [r.id for r in fake.replies_to(mention)] == [placeholder.id]  # edited, not posted again
    assert fake.followups(interaction.token) == []
    assert len([call for call in fake.calls if call.path.endswith("/callback")]) == 1
    queries = sorted(request.query for request in second.generator.requests)
    assert queries == ["also before", "before the stop"]


def _expired_interaction(channel: int, text: str = "too late") -> IncomingMessage:
    issued = datetime.now(UTC) - timedelta(minutes=16)
    return IncomingMessage(
        event_id=str(discord.utils.time_snowflake(issued)),
        channel=ChannelRef("discord", str(channel)),
        author_id="1001",
        author_name="user",
        text=text,
        raw={"kind": "interaction", "application_id": "1", "token": "expired", "channel_id": str(channel)},
    )


async def test_an_expired_interaction_is_answered_by_one_channel_message_quoting_it(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    message = _expired_interaction(channel)
    unreadable = IncomingMessage(
        event_id="1",
        channel=ChannelRef("discord", "1"),
        author_id="1",
        author_name="u",
        text="x",
        raw={"kind": "message", "channel_id": "not a number"},
    )
    async with running() as (adapter, _):
        # Stored while the token was alive: the deferred response, which cannot be edited any more.
        reply = adapter.reply_for(message, {"kind": "interaction", "ids": ["@original"]})
        assert isinstance(reply, MessageReply)
        await reply.begin()
        await reply.finish("the answer")
        assert adapter.reply_for(unreadable, None) is None
    [posted] = [p for p in fake.posted.values() if p.channel_id == channel and not p.deleted]
    assert (posted.kind, posted.reference) == ("channel", None)
    assert posted.content == "> user asked: too late\nthe answer"
    assert reply.handle == {"kind": "message", "channel_id": str(channel), "ids": [str(posted.id)]}
    assert not [call for call in fake.calls if call.path.startswith(("/webhooks", "/interactions"))]


async def test_a_resumed_expired_interaction_edits_its_channel_message_again(
    fake: FakeDiscord, running: StartRunning
) -> None:
    """The fallback message's handle is stored; a later restart edits that message, not a new one."""
    channel = fake.add_channel()
    message = _expired_interaction(channel)
    async with running() as (adapter, _):
        first = adapter.reply_for(message, None)
        assert first is not None
        await first.begin()
        await first.update("half")  # the process dies here
        again = adapter.reply_for(message, first.handle)
        assert again is not None
        await again.begin()
        await again.finish("the whole answer")
    posted = [p for p in fake.posted.values() if p.channel_id == channel and not p.deleted]
    assert [p.content for p in posted] == ["> user asked: too late\nthe whole answer"]


async def test_reply_for_a_stored_handle_edits_the_same_messages(
    fake: FakeDiscord, running: StartRunning
) -> None:
    """What a restart resumes: an earlier run showed a long partial answer to a mention in two messages."""
    channel = fake.add_channel()
    question = await fake.user_message(channel, f"<@{BOT_ID}> long one", mentions=(BOT_ID,))
    shown = [
        fake._post(
            channel,
            {"content": f"part {i}", "message_reference": {"message_id": str(question)}},
            kind="channel",
        )
        for i in range(2)
    ]
    message = IncomingMessage(
        event_id=str(question),
        channel=ChannelRef("discord", str(channel)),
        author_id="1001",
        author_name="user1001",
        text="long one",
        raw={"kind": "message", "channel_id": str(channel), "message_id": str(question)},
    )
    handle = {"kind": "message", "channel_id": str(channel), "ids": [str(p.id) for p in shown]}
    async with running() as (adapter, _):
        reply = adapter.reply_for(message, handle)
        assert reply is not None and reply.handle == handle
        await reply.begin()  # the stored messages are the placeholder: nothing is sent
        await reply.finish("the whole answer")
    assert [(r.id, r.content) for r in fake.replies_to(question)] == [(shown[0].id, "the whole answer")]
    assert shown[1].deleted
    assert not [call for call in fake.calls if call.method == "POST" and call.path.endswith("/messages")]
    assert reply.handle == {**handle, "ids": [str(shown[0].id)]}
