"""A bot killed between sending a reply and storing its id: the next run sends it again with the
same nonce (Discord's enforce_nonce) and gets the same message back, not a second one."""

from __future__ import annotations

from bot.events import ChannelRef, IncomingMessage
from tests.adapters.discord.conftest import StartRunning
from tests.adapters.discord.fake_discord import FakeDiscord


async def test_a_reply_whose_id_was_lost_is_sent_once(fake: FakeDiscord, running: StartRunning) -> None:
    channel = fake.add_channel()
    question = fake.snowflake()
    raw = {"kind": "message", "channel_id": str(channel), "message_id": str(question)}
    message = IncomingMessage(str(question), ChannelRef("discord", str(channel)), "1001", "u", "hi", raw=raw)
    async with running() as (adapter, _):
        killed = adapter.reply_for(message, None)
        assert killed is not None
        await killed.begin()  # ... and the process dies before storing killed.handle
        resumed = adapter.reply_for(message, {})
        assert resumed is not None
        await resumed.begin()
        await resumed.finish("the answer")
        assert resumed.handle == killed.handle
    assert [p.content for p in fake.bot_messages(channel)] == ["the answer"]
    other = IncomingMessage(str(fake.snowflake()), message.channel, "1001", "u", "hi", raw=raw)
    async with running() as (adapter, _):
        reply = adapter.reply_for(other, None)
        assert reply is not None
        await reply.begin()
    assert len(fake.bot_messages(channel)) == 2  # another event's reply is its own message
