import asyncio
import itertools
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.core import EMPTY_TEXT, HELP_TEXT, REFUSAL_TEXT, RESET_REFUSAL, RESET_TEXT, Bot
from bot.events import (
    ChannelRef,
    Command,
    IncomingMessage,
    Outcome,
    message_from_dict,
    message_to_dict,
    read_command,
)
from bot.generation import GenerationRequest
from bot.sanitize import clean_text
from storage.repository import ClaimResult, EventStatus
from tests.support import RecordingReply, ScriptedGenerator, SteppingClock, bot_stack

CHANNEL = ChannelRef("slack", "C1", "1700000000.000100")
_ids = itertools.count()


def msg(text: str, channel: ChannelRef = CHANNEL, **kw: object) -> IncomingMessage:
    values: dict[str, object] = {
        "event_id": f"E{next(_ids)}",
        "channel": channel,
        "author_id": "U1",
        "author_name": "alice",
        "text": text,
    }
    values.update(kw)
    return IncomingMessage(**values)  # type: ignore[arg-type]


async def ask(bot, message: IncomingMessage) -> tuple[Outcome, RecordingReply]:  # type: ignore[no-untyped-def]
    reply = RecordingReply()
    outcome = await bot.handle(message, reply)
    return outcome, reply


async def test_answer_is_streamed_and_persisted(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "alpha beta gamma delta")
    # One clock step per piece and an interval of one step: every piece is passed on.
    async with bot_stack(tmp_path, gen, clock=SteppingClock(0.25), stream_interval=0.25) as stack:
        outcome, reply = await ask(stack.bot, msg("hello"))
        turns = await stack.storage.recent_turns(CHANNEL, 10)
    assert outcome is Outcome.ANSWERED
    assert reply.calls == [
        ("begin", ""),
        ("update", "alpha"),
        ("update", "alpha beta"),
        ("update", "alpha beta gamma"),
        ("update", "alpha beta gamma delta"),
        ("finish", "alpha beta gamma delta"),
    ]
    assert [(t.user, t.assistant) for t in turns] == [("hello", "alpha beta gamma delta")]


async def test_updates_are_throttled(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "w " * 40)
    clock = SteppingClock(0.25)
    # 41 pieces ("w", " w" 39 times, the trailing " ") a quarter second apart, at most one update a
    # second: the 4th, 8th, ..., 40th piece.
    async with bot_stack(tmp_path, gen, clock=clock, stream_interval=1.0) as stack:
        _, reply = await ask(stack.bot, msg("hello"))
    assert clock.readings == 1 + 41  # the stream's start, then each piece
    assert reply.updates == [" ".join(["w"] * pieces) for pieces in range(4, 41, 4)]
    assert reply.final == ("finish", ("w " * 40).strip())


async def test_updates_come_a_full_interval_apart(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "  one two three four five")
    # Pieces: "  one", " two", ... at 0.5 s, 1.0 s, ...; an update needs 1.0 s since the last one.
    async with bot_stack(tmp_path, gen, clock=SteppingClock(0.5), stream_interval=1.0) as stack:
        _, reply = await ask(stack.bot, msg("hello"))
    assert reply.updates == ["  one two", "  one two three four"]
    assert reply.final == ("finish", "one two three four five")


async def test_conversation_continues_and_is_per_thread(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        await ask(stack.bot, msg("first"))
        _, second = await ask(stack.bot, msg("second"))
        other = ChannelRef("slack", "C1", "1700000000.000999")
        _, elsewhere = await ask(stack.bot, msg("third", channel=other))
        seen = stack.generator.requests
    assert second.final == ("finish", "Answer 2 to: second")
    assert seen[1].history == (("first", "Answer 1 to: first"),)
    assert elsewhere.final == ("finish", "Answer 1 to: third")
    assert seen[2].history == ()


async def test_history_survives_restart(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        await ask(stack.bot, msg("before restart"))
    async with bot_stack(tmp_path) as stack:
        _, reply = await ask(stack.bot, msg("after restart"))
    assert reply.final == ("finish", "Answer 2 to: after restart")


async def test_duplicate_event_is_never_answered_twice(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        first = msg("hello")
        outcomes = await asyncio.gather(*(ask(stack.bot, first) for _ in range(3)))
        assert sorted(o for o, _ in outcomes) == sorted(
            [Outcome.ANSWERED, Outcome.DUPLICATE, Outcome.DUPLICATE]
        )
        assert [r.calls for o, r in outcomes if o is Outcome.DUPLICATE] == [[], []]
    async with bot_stack(tmp_path) as stack:  # redelivery after a restart
        outcome, reply = await ask(stack.bot, first)
        assert outcome is Outcome.DUPLICATE and reply.calls == []
        assert len(await stack.storage.recent_turns(CHANNEL, 10)) == 1


async def test_unanswered_event_is_answered_on_redelivery_after_crash(tmp_path: Path) -> None:
    message = msg("lost in a crash")
    async with bot_stack(tmp_path) as stack:
        # A crashed process recorded the event and never answered.
        from bot.events import message_to_dict

        await stack.storage.claim_event("slack", message.event_id, message_to_dict(message))
    async with bot_stack(tmp_path) as stack:
        outcome, reply = await ask(stack.bot, message)
    assert outcome is Outcome.ANSWERED
    assert reply.final == ("finish", "Answer 1 to: lost in a crash")


async def test_recover_answers_unanswered_events_at_start(tmp_path: Path) -> None:
    from bot.events import message_to_dict

    message = msg("answer me after restart")
    async with bot_stack(tmp_path) as stack:
        await stack.storage.claim_event("slack", message.event_id, message_to_dict(message))
    replies: list[RecordingReply] = []

    class Adapter:
        platform = "slack"

        def reply_for(self, recovered: IncomingMessage) -> RecordingReply:
            assert recovered == message
            replies.append(RecordingReply())
            return replies[-1]

    async with bot_stack(tmp_path) as stack:
        assert await stack.bot.recover({"slack": Adapter()}) == 1  # type: ignore[dict-item]
        await asyncio.wait_for(replies[0].done.wait(), 5)
        assert await stack.bot.recover({"slack": Adapter()}) == 0  # type: ignore[dict-item]
    assert replies[0].final == ("finish", "Answer 1 to: answer me after restart")


async def test_commands(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        await ask(stack.bot, msg("remember me"))
        outcome, reply = await ask(stack.bot, msg("  RESET "))
        assert (outcome, reply.final) == (Outcome.COMMAND, ("finish", RESET_TEXT))
        assert await stack.storage.recent_turns(CHANNEL, 10) == []
        _, after = await ask(stack.bot, msg("again"))
        assert after.final == ("finish", "Answer 1 to: again")
        _, help_reply = await ask(stack.bot, msg("help"))
        assert help_reply.final == ("finish", HELP_TEXT)
        # An explicit command from an adapter wins over the text.
        outcome, reply = await ask(stack.bot, msg("reset", command=Command.CHAT))
        assert outcome is Outcome.ANSWERED
        assert len(stack.generator.requests) == 3


INVISIBLE = [
    "\u200b",  # zero-width space
    "\u200b\u200c\u200d",  # ... non-joiner, joiner
    "\ufeff",  # byte order mark
    " \u2060 \n\u200e\u200f ",  # word joiner, bidi marks, among whitespace
    "\u202a\u202b\u202c\u202d\u202e",  # bidi embeddings and overrides
    "\u2066\u2067\u2068\u2069",  # bidi isolates
    "\u00ad\u061c\U000e0001",  # other format characters: soft hyphen, Arabic mark, a tag
]


@pytest.mark.parametrize("text", ["", "   \n\t ", "\x00\x01", *INVISIBLE])
async def test_empty_message_gets_help(tmp_path: Path, text: str) -> None:
    async with bot_stack(tmp_path) as stack:
        outcome, reply = await ask(stack.bot, msg(text))
        assert stack.generator.requests == []
    assert (outcome, reply.final) == (Outcome.REJECTED, ("finish", EMPTY_TEXT))


@pytest.mark.parametrize(
    "text",
    [
        "\U0001f469\u200d\U0001f4bb",  # woman technologist: a ZWJ sequence
        "\u200bhi\u200b",
        "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",  # England's flag
    ],
)
async def test_format_characters_inside_text_are_kept(tmp_path: Path, text: str) -> None:
    async with bot_stack(tmp_path) as stack:
        outcome, _ = await ask(stack.bot, msg(text))
    assert outcome is Outcome.ANSWERED
    assert [request.query for request in stack.generator.requests] == [text]


async def test_reset_refused_unless_the_platform_allows_it(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        await ask(stack.bot, msg("remember me"))
        for refused in (msg("!!reset", may_reset=False), msg("", command=Command.RESET, may_reset=False)):
            outcome, reply = await ask(stack.bot, refused)
            assert (outcome, reply.final) == (Outcome.REFUSED, ("finish", RESET_REFUSAL))
        _, help_reply = await ask(stack.bot, msg("help", may_reset=False))
        assert help_reply.final == ("finish", HELP_TEXT)
        assert len(await stack.storage.recent_turns(CHANNEL, 10)) == 1
        outcome, _ = await ask(stack.bot, msg("//reset"))
        assert outcome is Outcome.COMMAND
        assert await stack.storage.recent_turns(CHANNEL, 10) == []


def test_may_reset_survives_storage_and_defaults_to_allowed() -> None:
    refused = msg("reset", may_reset=False)
    assert message_from_dict(message_to_dict(refused)) == refused
    stored_before_the_field = {k: v for k, v in message_to_dict(refused).items() if k != "may_reset"}
    assert message_from_dict(stored_before_the_field).may_reset is True


RESET_PIECES = [
    "reset",
    "RESET",
    "Reset",
    "help",
    "/",
    "!",
    " ",
    "\t",
    "\n",
    "\r",
    "\x00",
    "\u00a0",
    "\u200b",
    "\ufeff",
    "\u202e",
    "r",
    "e",
    "s",
    "t",
    "x",
    "@",
]


def reset_like_texts(count: int, seed: int = 20261203) -> list[str]:
    """The known bypasses, then random strings of the pieces a reset word is made of."""
    rng = random.Random(seed)
    generated = ("".join(rng.choices(RESET_PIECES, k=rng.randint(0, 5))) for _ in range(count))
    return ["!!reset", "//reset", "/!reset", *generated]


class ResetRecorder:
    """In-memory stand-in for Storage (SQLite commits would make thousands of cases take minutes):
    every event is new, no history, and it records which conversations were cleared."""

    def __init__(self) -> None:
        self.cleared: list[ChannelRef] = []

    async def has_history(self, channel: ChannelRef) -> bool:
        return True

    async def claim_event(self, platform: str, event_id: str, payload: object) -> ClaimResult:
        return ClaimResult.NEW

    async def mark_event(self, platform: str, event_id: str, status: EventStatus) -> None:
        pass

    async def recent_turns(self, channel: ChannelRef, limit: int) -> list[object]:
        return []

    async def append_turn(self, channel: ChannelRef, **turn: object) -> None:
        pass

    async def clear(self, channel: ChannelRef) -> int:
        self.cleared.append(channel)
        return 0


async def test_without_permission_no_text_resets(tmp_path: Path) -> None:
    """Whatever the text, a message the platform marks ``may_reset=False`` never clears the
    conversation; the ones the core reads as a reset get the refusal."""
    texts = reset_like_texts(5000)
    asked = {text for text in texts if read_command(clean_text(text)) is Command.RESET}
    assert len(asked) > 50  # the generator does reach reset words
    async with bot_stack(tmp_path) as stack:
        storage = ResetRecorder()
        bot = Bot(stack.settings, storage, stack.service)  # type: ignore[arg-type]
        assert (await ask(bot, msg("reset")))[0] is Outcome.COMMAND  # the recorder sees resets
        assert storage.cleared == [CHANNEL]
        for text in texts:
            outcome, reply = await ask(bot, msg(text, may_reset=False))
            if text in asked:
                assert (outcome, reply.final) == (Outcome.REFUSED, ("finish", RESET_REFUSAL)), repr(text)
    assert storage.cleared == [CHANNEL]


async def test_oversized_message_gets_a_clear_reply(tmp_path: Path) -> None:
    async with bot_stack(tmp_path, max_message_chars=100) as stack:
        outcome, reply = await ask(stack.bot, msg("x" * 101))
        assert stack.generator.requests == []
        assert await stack.storage.recent_turns(CHANNEL, 10) == []
    assert outcome is Outcome.REJECTED
    assert reply.final is not None and "limit is 100" in reply.final[1]


async def test_message_over_token_budget_is_rejected_without_model_call(tmp_path: Path) -> None:
    async with bot_stack(tmp_path, max_context_tokens=300, max_new_tokens=200) as stack:
        outcome, reply = await ask(stack.bot, msg("word " * 150))
        assert stack.generator.requests == []
    assert outcome is Outcome.REJECTED
    assert reply.final is not None and "too long" in reply.final[1]


async def test_history_is_trimmed_to_the_token_budget(tmp_path: Path) -> None:
    # Budget 100 prompt tokens; each stored turn costs 4 + 10 + 14 = 28 by the scripted count.
    async with bot_stack(tmp_path, max_context_tokens=150, max_new_tokens=50) as stack:
        for i in range(6):
            await ask(stack.bot, msg(f"q{i} " + "pad " * 9))
        await ask(stack.bot, msg("last"))
        last = stack.generator.requests[-1]
        gen = stack.generator
        stored = [(t.user, t.assistant) for t in await stack.storage.recent_turns(CHANNEL, 100)][:6]
    kept = len(last.history)
    assert 0 < kept < 6
    assert last.history == tuple(stored[6 - kept :])  # the newest turns are the ones kept
    assert gen.prompt_tokens("last", last.history) <= 100
    assert gen.prompt_tokens("last", stored[6 - kept - 1 :]) > 100


async def test_control_characters_and_surrogates_are_cleaned(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        outcome, _ = await ask(stack.bot, msg("he\x00llo\ud800 wor\x1bld\r\nnext"))
        turns = await stack.storage.recent_turns(CHANNEL, 10)
    assert outcome is Outcome.ANSWERED
    assert turns[0].user == "hello\ufffd world\nnext"


async def test_access_control_refuses_and_stores_nothing(tmp_path: Path) -> None:
    async with bot_stack(tmp_path, slack_allowed_users="U9") as stack:
        outcome, reply = await ask(stack.bot, msg("let me in"))
        assert (outcome, reply.final) == (Outcome.REFUSED, ("finish", REFUSAL_TEXT))
        assert await stack.storage.recent_turns(CHANNEL, 10) == []
        assert await stack.storage.unanswered_events(datetime(2000, 1, 1, tzinfo=UTC)) == []
        outcome, _ = await ask(stack.bot, msg("ok", author_id="U9"))
        assert outcome is Outcome.ANSWERED
    async with bot_stack(tmp_path, slack_allowed_channels="C2", access_denied_mode="silent") as stack:
        outcome, reply = await ask(stack.bot, msg("hello"))
        assert (outcome, reply.calls) == (Outcome.IGNORED, [])
        # Another platform's allowlist does not apply here.
        outcome, _ = await ask(stack.bot, msg("hi", channel=ChannelRef("discord", "C1")))
        assert outcome is Outcome.ANSWERED


async def test_followup_only_needs_existing_history(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        outcome, reply = await ask(stack.bot, msg("not for you", followup_only=True))
        assert (outcome, reply.calls) == (Outcome.IGNORED, [])
        await ask(stack.bot, msg("hello"))
        outcome, _ = await ask(stack.bot, msg("follow up", followup_only=True))
        assert outcome is Outcome.ANSWERED


async def test_messages_in_one_conversation_are_answered_in_order(tmp_path: Path) -> None:
    gen = ScriptedGenerator(token_delay=0.005)
    async with bot_stack(tmp_path, gen) as stack:
        results = await asyncio.gather(*(ask(stack.bot, msg(f"m{i}")) for i in range(5)))
        other = ChannelRef("slack", "C2")
        results += await asyncio.gather(*(ask(stack.bot, msg(f"o{i}", channel=other)) for i in range(3)))
        turns = await stack.storage.recent_turns(CHANNEL, 10)
    assert [t.user for t in turns] == [f"m{i}" for i in range(5)]
    # The i-th message saw the i earlier answers.
    assert [t.assistant for t in turns] == [f"Answer {i + 1} to: m{i}" for i in range(5)]
    assert all(o is Outcome.ANSWERED for o, _ in results)


async def test_failed_generation_persists_nothing_and_tells_the_user(tmp_path: Path) -> None:
    gen = ScriptedGenerator(fail_with=RuntimeError("secret internals"))
    async with bot_stack(tmp_path, gen) as stack:
        message = msg("hello")
        outcome, reply = await ask(stack.bot, message)
        assert await stack.storage.recent_turns(CHANNEL, 10) == []
        # A failed event is not answered again on redelivery.
        again, _ = await ask(stack.bot, message)
    assert outcome is Outcome.FAILED
    assert reply.final is not None and reply.final[0] == "fail"
    assert "secret" not in reply.final[1]
    assert again is Outcome.DUPLICATE


async def test_cancelled_generation_persists_nothing(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "w " * 500, token_delay=0.01)
    async with bot_stack(tmp_path, gen) as stack:
        reply = RecordingReply()
        task = asyncio.create_task(stack.bot.handle(msg("hello"), reply))
        await asyncio.to_thread(gen.started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await stack.storage.recent_turns(CHANNEL, 10) == []
        # The inference thread is free again quickly.
        stack.generator.reply = lambda r: "ok"
        _, after = await asyncio.wait_for(ask(stack.bot, msg("next")), 3)
    assert reply.final == ("fail", "The answer was cancelled.")
    assert after.final == ("finish", "ok")


async def test_busy_service_tells_the_user(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "w " * 200 if r.query == "slow" else "quick", token_delay=0.01)
    async with bot_stack(tmp_path, gen, queue_size=1) as stack:
        slow = asyncio.create_task(ask(stack.bot, msg("slow", channel=ChannelRef("slack", "A"))))
        await asyncio.to_thread(gen.started.wait, 5)
        queued = asyncio.create_task(ask(stack.bot, msg("q", channel=ChannelRef("slack", "B"))))
        await asyncio.sleep(0.05)
        outcome, reply = await ask(stack.bot, msg("rejected", channel=ChannelRef("slack", "C")))
        await asyncio.gather(slow, queued)
    assert outcome is Outcome.FAILED
    assert reply.final is not None and reply.final[0] == "fail" and "busy" in reply.final[1]


def test_generation_request_is_hashable_and_frozen() -> None:
    request = GenerationRequest(query="q")
    with pytest.raises(AttributeError):
        request.query = "x"  # type: ignore[misc]


async def test_cancel_while_delivering_a_stored_answer_keeps_it_answered(tmp_path: Path) -> None:
    class SlowFinish(RecordingReply):
        def __init__(self) -> None:
            super().__init__()
            self.finishing = asyncio.Event()

        async def finish(self, text: str) -> None:
            self.finishing.set()
            await asyncio.sleep(10)

    async with bot_stack(tmp_path) as stack:
        message = msg("hello")
        reply = SlowFinish()
        task = asyncio.create_task(stack.bot.handle(message, reply))
        await asyncio.wait_for(reply.finishing.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [kind for kind, _ in reply.calls] == ["begin"]  # no "cancelled" note under the answer
        assert len(await stack.storage.recent_turns(CHANNEL, 10)) == 1
    async with bot_stack(tmp_path) as stack:  # after a restart: answered, so never answered again
        again, _ = await ask(stack.bot, message)
    assert again is Outcome.DUPLICATE


async def test_storage_calls_finish_even_when_the_caller_is_cancelled(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        tasks = [
            asyncio.create_task(
                stack.storage.append_turn(
                    ChannelRef("slack", f"C{i}"),
                    author_id="u",
                    author_name="u",
                    user_text="q",
                    user_tokens=1,
                    assistant_text="a",
                    assistant_tokens=1,
                )
            )
            for i in range(10)
        ]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    async with bot_stack(tmp_path) as stack:
        stored = [await stack.storage.recent_turns(ChannelRef("slack", f"C{i}"), 5) for i in range(10)]
    assert all(len(turns) == 1 for turns in stored)
