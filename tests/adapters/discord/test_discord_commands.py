"""Slash commands through the real discord.py client, the fake Discord and the real core."""

from __future__ import annotations

import logging

import pytest

from adapters.discord_commands import STALE_COMMAND, unknown_command
from bot.core import HELP_TEXT, RESET_REFUSAL, RESET_TEXT
from bot.events import ChannelRef
from tests.adapters.discord.conftest import StartRunning
from tests.adapters.discord.fake_discord import (
    ADMIN_ROLE_PERMISSIONS,
    APP_ID,
    MEMBER_PERMISSIONS,
    FakeDiscord,
)
from tests.support import ScriptedGenerator

WORDS = " ".join(f"word{i}" for i in range(40))


async def ask(fake: FakeDiscord, channel: int, prompt: str, expected: str) -> str:
    """Run /ask and wait for the finished answer; returns the interaction token."""
    interaction = await fake.slash_command("ask", channel, options={"prompt": prompt})
    await fake.wait_for(lambda: fake.answer_text(interaction.token) == expected)
    return interaction.token


async def test_ask_defers_then_streams_edits_ending_with_the_model_text(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    generator = ScriptedGenerator(lambda request: f"{request.query}: {WORDS}", token_delay=0.01)
    expected = f"count: {WORDS}"
    async with running(generator):
        token = await ask(fake, channel, "count", expected)

    interaction = fake.interactions[token]
    assert interaction.callback == {"type": 5}  # deferred with "thinking…", public
    paths = [call.path for call in fake.calls]
    first_edit = paths.index(f"/webhooks/{APP_ID}/{token}/messages/@original")
    callback = paths.index(f"/interactions/{interaction.id}/{token}/callback")
    assert callback < first_edit
    assert fake.calls[callback].query == {"with_response": "1"}
    edits = fake.originals[token].edits
    assert len(edits) >= 3, edits  # partial text while generating, then the final edit
    assert [edit for edit in edits if not expected.startswith(edit)] == []
    assert edits[-1] == expected
    assert fake.followups(token) == []
    assert [request.query for request in generator.requests] == ["count"]
    assert not any(call.method == "PUT" for call in fake.calls), (
        "commands are registered only by discord-sync"
    )


async def test_ask_twice_continues_the_channel_and_threads_are_their_own_conversation(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel, other = fake.add_channel(), fake.add_channel()
    thread = fake.add_thread(channel)
    async with running() as (_, stack):
        await ask(fake, channel, "first", "Answer 1 to: first")
        await ask(fake, channel, "second", "Answer 2 to: second")
        await ask(fake, other, "elsewhere", "Answer 1 to: elsewhere")
        await ask(fake, thread, "in a thread", "Answer 1 to: in a thread")
        await ask(fake, thread, "again", "Answer 2 to: again")

        in_thread = await stack.storage.recent_turns(ChannelRef("discord", str(channel), str(thread)), 10)
        in_channel = await stack.storage.recent_turns(ChannelRef("discord", str(channel)), 10)
    assert [turn.user for turn in in_thread] == ["in a thread", "again"]
    assert [turn.user for turn in in_channel] == ["first", "second"]


async def test_reset_by_allowed_and_disallowed_members(fake: FakeDiscord, running: StartRunning) -> None:
    channel = fake.add_channel()
    async with running(discord_admin_ids="4242"):
        await ask(fake, channel, "one", "Answer 1 to: one")

        refused = await fake.slash_command("reset", channel, permissions=MEMBER_PERMISSIONS)
        await fake.wait_for(lambda: refused.callback)
        assert refused.callback == {
            "type": 4,
            "data": {"content": RESET_REFUSAL, "tts": False, "flags": 64, "allowed_mentions": {"parse": []}},
        }
        await ask(fake, channel, "two", "Answer 2 to: two")  # the history survived

        moderator = await fake.slash_command(
            "reset", channel, permissions=MEMBER_PERMISSIONS | ADMIN_ROLE_PERMISSIONS
        )
        await fake.wait_for(lambda: fake.answer_text(moderator.token) == RESET_TEXT)
        await ask(fake, channel, "three", "Answer 1 to: three")

        admin = await fake.slash_command("reset", channel, user_id=4242, permissions=MEMBER_PERMISSIONS)
        await fake.wait_for(lambda: fake.answer_text(admin.token) == RESET_TEXT)
        await ask(fake, channel, "four", "Answer 1 to: four")


async def test_reset_in_a_dm_is_the_users_own_choice(fake: FakeDiscord, running: StartRunning) -> None:
    dm = fake.snowflake()
    async with running():
        first = await fake.slash_command("ask", dm, options={"prompt": "hi"}, direct=True)
        await fake.wait_for(lambda: fake.answer_text(first.token) == "Answer 1 to: hi")
        reset = await fake.slash_command("reset", dm, direct=True)
        await fake.wait_for(lambda: fake.answer_text(reset.token) == RESET_TEXT)


async def test_help_is_ephemeral(fake: FakeDiscord, running: StartRunning) -> None:
    channel = fake.add_channel()
    async with running():
        interaction = await fake.slash_command("help", channel)
        await fake.wait_for(lambda: fake.answer_text(interaction.token) == HELP_TEXT)
    assert interaction.callback == {"type": 5, "data": {"flags": 64}}
    assert fake.originals[interaction.token].ephemeral


async def test_an_ignored_command_removes_the_deferred_response(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channel = fake.add_channel()
    generator = ScriptedGenerator()
    async with running(generator, access_denied_mode="silent", discord_allowed_users="someone-else"):
        interaction = await fake.slash_command("ask", channel, options={"prompt": "hello"})
        await fake.wait_for(
            lambda: fake.originals.get(interaction.token, None) and fake.originals[interaction.token].deleted
        )
    assert generator.requests == []
    assert fake.originals[interaction.token].edits == []


async def test_twenty_concurrent_asks_in_different_channels_are_each_answered_once(
    fake: FakeDiscord, running: StartRunning
) -> None:
    channels = [fake.add_channel() for _ in range(20)]
    generator = ScriptedGenerator(token_delay=0.002)
    async with running(generator):
        interactions = [
            await fake.slash_command("ask", channel, options={"prompt": f"q{index}"})
            for index, channel in enumerate(channels)
        ]
        await fake.wait_for(
            lambda: all(
                fake.answer_text(interaction.token) == f"Answer 1 to: q{index}"
                for index, interaction in enumerate(interactions)
            ),
            within=60,
        )
    assert sorted(request.query for request in generator.requests) == sorted(f"q{i}" for i in range(20))
    callbacks = [call for call in fake.calls if call.path.endswith("/callback")]
    assert len(callbacks) == 20
    assert all(fake.followups(interaction.token) == [] for interaction in interactions)
    assert len(fake.posted) == 20  # one response per interaction, nothing else


def ephemeral_note(text: str) -> dict[str, object]:
    return {
        "type": 4,
        "data": {"content": text, "tts": False, "flags": 64, "allowed_mentions": {"parse": []}},
    }


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, bool]]:
    """(level, message, with traceback) of every record at WARNING or above."""
    return [
        (record.levelno, record.getMessage(), record.exc_info is not None)
        for record in caplog.records
        if record.levelno >= logging.WARNING
    ]


async def test_a_stale_or_unknown_command_is_explained_with_one_warning(
    fake: FakeDiscord, running: StartRunning, caplog: pytest.LogCaptureFixture
) -> None:
    channel = fake.add_channel()
    generator = ScriptedGenerator()
    async with running(generator):
        stale = await fake.slash_command("ask", channel)  # registered before /ask had its prompt
        await fake.wait_for(lambda: stale.callback)
        assert logged(caplog) == [
            (
                logging.WARNING,
                "Discord: /ask does not match its registration; run chatglm-bot discord-sync",
                False,
            )
        ]
        caplog.clear()
        unknown = await fake.slash_command("translate", channel, options={"text": "hi"})
        await fake.wait_for(lambda: unknown.callback)
        assert logged(caplog) == [
            (logging.WARNING, "Discord: unknown command /translate; run chatglm-bot discord-sync", False)
        ]
    assert stale.callback == ephemeral_note(STALE_COMMAND)
    assert unknown.callback == ephemeral_note(unknown_command("translate"))
    assert generator.requests == []


async def test_autocomplete_gets_no_suggestions_and_logs_nothing(
    fake: FakeDiscord, running: StartRunning, caplog: pytest.LogCaptureFixture
) -> None:
    channel = fake.add_channel()
    generator = ScriptedGenerator()
    async with running(generator):
        typing = await fake.slash_command("ask", channel, options={"prompt": "wh"}, focused="prompt")
        await fake.wait_for(lambda: typing.callback)
        unknown = await fake.slash_command("gone", channel, options={"q": "x"}, focused="q")
        await fake.wait_for(lambda: unknown.callback)
    assert typing.callback == unknown.callback == {"type": 8, "data": {"choices": []}}
    assert logged(caplog) == []
    assert generator.requests == []


async def test_a_replayed_interaction_is_dropped_and_an_expired_one_warns_without_traceback(
    fake: FakeDiscord, running: StartRunning, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.core")
    channel = fake.add_channel()
    generator = ScriptedGenerator()

    def dropped() -> bool:
        return any("duplicate discord event" in record.getMessage() for record in caplog.records)

    async with running(generator) as (_, stack):
        token = await ask(fake, channel, "once", "Answer 1 to: once")
        # A replay has the same interaction id: recorded once, so it is dropped before any defer.
        await fake.replay(fake.interactions[token])
        await fake.wait_for(dropped)
        assert logged(caplog) == []
        late = await fake.slash_command("ask", channel, options={"prompt": "too late"}, expired=True)
        await fake.wait_for(lambda: len(logged(caplog)) == 2)  # 10062 on the defer: unknown interaction
        [(level, message, traceback), (core_level, core_message, core_traceback)] = logged(caplog)
        assert (level, traceback) == (core_level, core_traceback) == (logging.WARNING, False)
        assert "already answered or has expired" in message and str(late.id) in message
        assert "the Discord interaction has expired" in core_message
        event = await stack.storage.event_state("discord", str(late.id))
        assert event is not None and event.status == "failed"
    assert fake.answer_text(token) == "Answer 1 to: once"
    assert fake.answer_text(late.token) is None  # nothing was sent through the dead token
    assert [request.query for request in generator.requests] == ["once", "too late"]
