"""Mentions, DMs, long answers and mention safety through the real discord.py client."""

from __future__ import annotations

import asyncio
import re

from adapters.discord_reply import PLACEHOLDER
from adapters.text import split_message
from bot.core import RESET_REFUSAL, RESET_TEXT
from bot.events import ChannelRef
from bot.generation import GenerationRequest
from tests.adapters.discord.conftest import StartRunning
from tests.adapters.discord.fake_discord import BOT_ID, GUILD_ID, FakeDiscord, Fault, Posted, server_error
from tests.support import ScriptedGenerator


async def answer_to(fake: FakeDiscord, message_id: int, expected: str) -> list[Posted]:
    """Wait until the replies to ``message_id`` read ``expected`` (one per part, in order)."""
    parts = split_message(expected, 2000)
    replies: list[Posted] = await fake.wait_for(
        lambda: (replies := fake.replies_to(message_id)) and [r.content for r in replies] == parts and replies
    )
    return replies


async def test_a_mention_gets_a_reply_and_everything_else_is_ignored(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    generator = ScriptedGenerator()
    async with running(generator):
        await fake.user_message(channel, "just chatting, no mention")
        await fake.user_message(channel, "@everyone meeting now", everyone=True)
        await fake.user_message(channel, f"<@{BOT_ID}> I am a bot", bot=True, mentions=(BOT_ID,))
        await fake.user_message(channel, f"<@{BOT_ID}>", message_type=7, mentions=(BOT_ID,))  # a join
        first = await fake.user_message(channel, f"<@{BOT_ID}> what is up?", mentions=(BOT_ID,))
        [reply] = await answer_to(fake, first, "Answer 1 to: what is up?")
        second = await fake.user_message(channel, f"and <@!{BOT_ID}> then?", mentions=(BOT_ID,))
        await answer_to(fake, second, "Answer 2 to: and then?")

    assert [request.query for request in generator.requests] == ["what is up?", "and then?"]
    assert len(fake.posted) == 2  # the two replies, nothing for the ignored messages
    create = next(call for call in fake.calls if call.method == "POST" and call.path.endswith("/messages"))
    assert isinstance(create.body, dict)
    assert create.body["content"] == PLACEHOLDER  # posted at once, then edited with the answer
    assert int(create.body["message_reference"]["message_id"]) == first
    assert reply.channel_id == channel


async def test_a_queued_mention_shows_typing_at_once_and_its_placeholder_in_its_turn(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    generator = ScriptedGenerator(token_delay=0.1)  # the first answer streams for about a second

    def typing_calls() -> list[int]:
        return [index for index, call in enumerate(fake.calls) if call.path == f"/channels/{channel}/typing"]

    async with running(generator):
        first = await fake.user_message(channel, f"<@{BOT_ID}> long one", mentions=(BOT_ID,))
        await fake.wait_for(lambda: fake.replies_to(first))
        second = await fake.user_message(channel, f"<@{BOT_ID}> me too", mentions=(BOT_ID,))
        await fake.wait_for(lambda: len(typing_calls()) == 2)
        assert fake.replies_to(second) == []  # queued behind the first: only "typing" so far
        await answer_to(fake, first, "Answer 1 to: long one")
        await answer_to(fake, second, "Answer 2 to: me too")
    posts = [
        index
        for index, call in enumerate(fake.calls)
        if call.method == "POST" and call.path.endswith("/messages")
    ]
    assert typing_calls()[0] < posts[0] and typing_calls()[1] < posts[1]


async def test_a_refused_typing_indicator_does_not_stop_the_answer(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    refused = fake.add_fault(
        Fault(lambda call: call.path.endswith("/typing"), answers=[server_error(403)] * 5)
    )
    async with running():
        message = await fake.user_message(channel, f"<@{BOT_ID}> hi", mentions=(BOT_ID,))
        await answer_to(fake, message, "Answer 1 to: hi")
    assert refused.seen == 1


async def test_a_mention_in_a_thread_is_answered_in_the_thread(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    thread = fake.add_thread(channel)
    async with running():
        message = await fake.user_message(thread, f"<@{BOT_ID}> hi", mentions=(BOT_ID,))
        [reply] = await answer_to(fake, message, "Answer 1 to: hi")
        # /ask in the same thread continues the same conversation.
        interaction = await fake.slash_command("ask", thread, options={"prompt": "more"})
        await fake.wait_for(lambda: fake.answer_text(interaction.token) == "Answer 2 to: more")
    assert reply.channel_id == thread


async def test_any_dm_is_answered_and_reads_reset_itself(fake: FakeDiscord, running: StartRunning) -> None:
    dm = fake.snowflake()
    async with running():
        first = await fake.user_message(dm, "hello in private", direct=True)
        await answer_to(fake, first, "Answer 1 to: hello in private")
        second = await fake.user_message(dm, "and again", direct=True)
        await answer_to(fake, second, "Answer 2 to: and again")
        reset = await fake.user_message(dm, "reset", direct=True)
        await answer_to(fake, reset, RESET_TEXT)
        fresh = await fake.user_message(dm, "anew", direct=True)
        await answer_to(fake, fresh, "Answer 1 to: anew")


# ScriptedGenerator emits at most max_new_tokens words; these answers are longer than the default.
LONG = {"max_new_tokens": 2000, "max_context_tokens": 4096}


async def test_reset_by_mention_follows_the_reset_permission(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    async with running(discord_admin_ids="4242"):
        first = await fake.user_message(channel, f"<@{BOT_ID}> one", mentions=(BOT_ID,))
        await answer_to(fake, first, "Answer 1 to: one")
        refused = await fake.user_message(channel, f"<@{BOT_ID}> reset", mentions=(BOT_ID,))
        await answer_to(fake, refused, RESET_REFUSAL)
        second = await fake.user_message(channel, f"<@{BOT_ID}> two", mentions=(BOT_ID,))
        await answer_to(fake, second, "Answer 2 to: two")  # the history survived
        # However the core reads the words, a member without the permission never resets.
        for bypass in ("!!reset", "//reset", "/!reset"):
            refused = await fake.user_message(channel, f"<@{BOT_ID}> {bypass}", mentions=(BOT_ID,))
            await answer_to(fake, refused, RESET_REFUSAL)
        kept = await fake.user_message(channel, f"<@{BOT_ID}> kept", mentions=(BOT_ID,))
        await answer_to(fake, kept, "Answer 3 to: kept")
        admin = await fake.user_message(channel, f"<@{BOT_ID}> !!reset", user_id=4242, mentions=(BOT_ID,))
        await answer_to(fake, admin, RESET_TEXT)
        third = await fake.user_message(channel, f"<@{BOT_ID}> three", mentions=(BOT_ID,))
        await answer_to(fake, third, "Answer 1 to: three")


def long_answer(request: GenerationRequest) -> str:
    prose = " ".join(f"Sentence {i} says something about {request.query}." for i in range(14))
    code = "```python\n" + "\n".join(f"print({i})  # line {i} of the listing" for i in range(80)) + "\n```"
    return "\n\n".join([prose, prose, code, prose, prose])


def assert_split_well(parts: list[str], text: str) -> None:
    assert len(text) >= 5000
    assert len(parts) >= 3
    assert all(len(part) <= 2000 for part in parts)
    for part in parts:  # every message is valid Markdown on its own: fences balanced
        assert len(re.findall(r"^```", part, flags=re.MULTILINE)) % 2 == 0, part

    def words(value: str) -> list[str]:
        return re.sub(r"```(python)?", " ", value).split()

    assert words("\n".join(parts)) == words(text)  # nothing lost, nothing repeated


async def test_a_5000_character_answer_continues_in_follow_ups(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    expected = long_answer(GenerationRequest(query="splitting"))
    async with running(ScriptedGenerator(long_answer), **LONG):
        interaction = await fake.slash_command("ask", channel, options={"prompt": "splitting"})
        parts = split_message(expected, 2000)
        await fake.wait_for(lambda: fake.answer_text(interaction.token) == "\n".join(parts))
    shown = [fake.originals[interaction.token].content] + [
        p.content for p in fake.followups(interaction.token)
    ]
    assert shown == parts
    assert_split_well(shown, expected)
    assert not any(p.ephemeral for p in fake.followups(interaction.token))


async def test_a_5000_character_answer_to_a_mention_continues_in_further_replies(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    expected = long_answer(GenerationRequest(query="splitting"))
    async with running(ScriptedGenerator(long_answer), **LONG):
        message = await fake.user_message(channel, f"<@{BOT_ID}> splitting", mentions=(BOT_ID,))
        replies = await answer_to(fake, message, expected)
    assert_split_well([reply.content for reply in replies], expected)


async def test_no_send_or_edit_can_ping_anyone(fake: FakeDiscord, running: StartRunning) -> None:
    channel = fake.add_channel()
    hostile = "@everyone @here <@&900000000000000099> <@1001> look at this! " + "filler " * 400

    generator = ScriptedGenerator(lambda request: hostile, token_delay=0.0005)
    async with running(generator, **LONG):
        interaction = await fake.slash_command("ask", channel, options={"prompt": "ping"})
        message = await fake.user_message(channel, f"<@{BOT_ID}> ping", mentions=(BOT_ID,))
        await fake.wait_for(
            lambda: fake.answer_text(interaction.token) == "\n".join(split_message(hostile.strip(), 2000))
        )
        await answer_to(fake, message, hostile.strip())
        refused = await fake.slash_command("reset", channel)  # an ephemeral refusal is a send too
        await fake.wait_for(lambda: refused.callback)

    sends = [call for call in fake.calls if call.carries_content]
    kinds = {(call.method, call.path.split("/")[1]) for call in sends}
    # Every kind of send and edit happened: interaction response, webhook edit and follow-up,
    # channel message and its edit.
    assert kinds == {
        ("POST", "interactions"),
        ("PATCH", "webhooks"),
        ("POST", "webhooks"),
        ("POST", "channels"),
        ("PATCH", "channels"),
    }
    assert fake.mention_leaks() == []
    assert "@everyone" in fake.originals[interaction.token].content  # the text itself is kept


async def test_deleting_the_question_cancels_its_answer(fake: FakeDiscord, running: StartRunning) -> None:
    channel = fake.add_channel()
    generator = ScriptedGenerator(lambda request: "w " * 2000, token_delay=0.005)
    async with running(generator, **LONG) as (_, stack):
        question = await fake.user_message(channel, f"<@{BOT_ID}> never mind", mentions=(BOT_ID,))
        assert await asyncio.to_thread(generator.started.wait, 10)
        await fake.dispatch(
            "MESSAGE_DELETE", {"id": str(question), "channel_id": str(channel), "guild_id": str(GUILD_ID)}
        )
        await fake.wait_for(
            lambda: (replies := fake.replies_to(question)) and "cancelled" in replies[-1].content
        )
        assert await stack.storage.recent_turns(ChannelRef("discord", str(channel)), 5) == []
