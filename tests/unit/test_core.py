import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bot import core
from bot.core import EMPTY_TEXT, HELP_TEXT, REFUSAL_TEXT, RESET_REFUSAL, RESET_TEXT, Bot
from bot.events import (
    ChannelRef,
    Command,
    DeliveryError,
    IncomingMessage,
    Outcome,
    message_from_dict,
    message_to_dict,
    read_command,
)
from bot.generation import GenerationRequest
from bot.sanitize import clean_user_text
from storage.repository import Claim, ClaimResult, EventStatus, FinalKind, StoredEvent
from tests.support import RecordingReply, ScriptedGenerator, SteadyConnection, bot_stack, default_reply

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
    gen = ScriptedGenerator(lambda r: "alpha beta gamma delta", token_delay=0.05)
    async with bot_stack(tmp_path, gen, stream_interval=0.0) as stack:
        outcome, reply = await ask(stack.bot, msg("hello"))
        turns = await stack.storage.recent_turns(CHANNEL, 10)
    assert outcome is Outcome.ANSWERED
    assert reply.calls[0] == ("begin", "") and reply.final == ("finish", "alpha beta gamma delta")
    # Each edit carries the whole text so far, growing.
    assert reply.updates and all("alpha beta gamma delta".startswith(u) for u in reply.updates)
    assert reply.updates == sorted(set(reply.updates), key=len)
    assert [(t.user, t.assistant) for t in turns] == [("hello", "alpha beta gamma delta")]


class SlowEdits(RecordingReply):
    """A platform whose edits take ``edit_s``: records when each started and ended."""

    def __init__(self, edit_s: float) -> None:
        super().__init__()
        self.edit_s = edit_s
        self.spans: list[tuple[float, float]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def update(self, text: str) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        started = time.monotonic()
        await asyncio.sleep(self.edit_s)
        self.spans.append((started, time.monotonic()))
        self.in_flight -= 1
        await super().update(text)

    async def finish(self, text: str) -> None:
        assert self.in_flight == 0, "the final text raced an edit in flight"
        await super().finish(text)


@pytest.mark.parametrize(("edit_s", "interval"), [(0.15, 0.05), (0.01, 0.1)])
async def test_edits_never_overlap_and_are_spaced_from_the_previous_end(
    tmp_path: Path, edit_s: float, interval: float
) -> None:
    gen = ScriptedGenerator(lambda r: "w " * 60, token_delay=0.01)  # about 0.6 s of tokens
    async with bot_stack(tmp_path, gen, stream_interval=interval) as stack:
        reply = SlowEdits(edit_s)
        started = time.monotonic()
        assert await stack.bot.handle(msg("hello"), reply) is Outcome.ANSWERED
        took = time.monotonic() - started
    assert reply.most_in_flight == 1
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(reply.spans)]
    assert all(gap >= interval - 0.005 for gap in gaps), gaps
    # A slow platform gets fewer edits, never a queue of them: at most one per edit + interval.
    assert 1 <= len(reply.updates) <= took / (edit_s + interval) + 1
    assert all(len(a) < len(b) for a, b in itertools.pairwise(reply.updates))
    assert reply.final == ("finish", ("w " * 60).strip())


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


async def _crashed_with(tmp_path: Path, message: IncomingMessage, **state: Any) -> None:
    """Leave ``message`` recorded as a killed earlier run of this replica would have."""
    async with bot_stack(tmp_path) as stack:
        claim = await stack.storage.record_event(
            "slack", message.event_id, str(message.channel), message_to_dict(message)
        )
        assert claim.event is not None
        if "handle" in state:
            await stack.storage.save_reply_handle(claim.event, state["handle"])
            await stack.storage.set_status(claim.event, EventStatus.GENERATING)
        if "final" in state:
            await stack.storage.save_final(claim.event, state["final"], FinalKind.TEXT)


class FakeAdapter(SteadyConnection):
    """An adapter as the core sees it: rebuilds replies from stored handles, resolves names."""

    platform = "slack"

    def __init__(self, resolve_delay: Callable[[IncomingMessage], float] | None = None) -> None:
        self.replies: list[RecordingReply] = []
        self.handles: list[dict[str, Any] | None] = []
        self._delay = resolve_delay

    async def start(self, core: object) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def resolve(self, message: IncomingMessage) -> IncomingMessage:
        if self._delay is not None:
            await asyncio.sleep(self._delay(message))
        return replace(message, author_name=f"resolved {message.author_id}")

    def reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> RecordingReply:
        self.handles.append(handle)
        self.replies.append(RecordingReply(f"recovered {message.event_id}", resumed=handle))
        return self.replies[-1]


async def test_unanswered_event_is_answered_on_redelivery_after_crash(tmp_path: Path) -> None:
    message = msg("lost in a crash")
    await _crashed_with(tmp_path, message)
    async with bot_stack(tmp_path) as stack:
        outcome, reply = await ask(stack.bot, message)
    assert outcome is Outcome.ANSWERED
    assert reply.final == ("finish", "Answer 1 to: lost in a crash")


async def test_a_redelivery_of_a_started_answer_finishes_it_in_the_same_message(tmp_path: Path) -> None:
    message = msg("half written when killed")
    await _crashed_with(tmp_path, message, handle={"reply": "the placeholder"})
    async with bot_stack(tmp_path) as stack:
        adapter = FakeAdapter()
        stack.bot.attach(adapter)
        fresh = RecordingReply("fresh")
        assert await stack.bot.handle(message, fresh) is Outcome.ANSWERED
    assert fresh.calls == []  # nothing new posted
    assert adapter.handles == [{"reply": "the placeholder"}]
    assert adapter.replies[0].final == ("finish", "Answer 1 to: half written when killed")


async def test_start_resumes_every_unfinished_state_in_the_stored_message(tmp_path: Path) -> None:
    received, generating, answered = msg("not started"), msg("half"), msg("done, not shown")
    other = ChannelRef("slack", "C9")
    await _crashed_with(tmp_path, received)
    await _crashed_with(tmp_path, replace(generating, channel=other), handle={"reply": "partial"})
    await _crashed_with(tmp_path, replace(answered, channel=ChannelRef("slack", "C8")), final="stored answer")
    async with bot_stack(tmp_path) as stack:
        adapter = FakeAdapter()
        stack.bot.attach(adapter)
        assert await stack.bot.start() == 3
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in adapter.replies)), 5)
        assert await stack.bot.recover() == 0
        finals = {r.name: r.final for r in adapter.replies}
        assert (
            stack.generator.requests and len(stack.generator.requests) == 2
        )  # the answered one is not redone

        async def states() -> list[EventStatus | None]:
            found = [
                await stack.storage.event_state("slack", m.event_id) for m in (received, generating, answered)
            ]
            return [state.status if state is not None else None for state in found]

        # "delivered" is stored just after the reply's finish() returns: give it a moment, bounded.
        for _ in range(100):
            if await states() == [EventStatus.DELIVERED] * 3:
                break
            await asyncio.sleep(0.05)
        delivered = await states()
    assert finals == {
        f"recovered {received.event_id}": ("finish", "Answer 1 to: not started"),
        f"recovered {generating.event_id}": ("finish", "Answer 1 to: half"),
        f"recovered {answered.event_id}": ("finish", "stored answer"),
    }
    assert adapter.handles.count({"reply": "partial"}) == 1
    assert delivered == [EventStatus.DELIVERED] * 3


async def test_names_are_resolved_after_recording_and_cannot_reorder(tmp_path: Path) -> None:
    # The first sender's look-up is the slowest: arrival order must still win.
    delays = {f"U{i}": 0.05 * (5 - i) for i in range(5)}
    async with bot_stack(tmp_path) as stack:
        stack.bot.attach(FakeAdapter(lambda m: delays[m.author_id]))
        replies = [RecordingReply(str(i)) for i in range(5)]
        for i, reply in enumerate(replies):
            assert await stack.bot.submit(msg(f"m{i}", author_id=f"U{i}"), reply) is Outcome.ACCEPTED
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 10)
        turns = await stack.storage.recent_turns(CHANNEL, 10)
        requests = stack.generator.requests
    assert [t.user for t in turns] == [f"m{i}" for i in range(5)]
    assert [len(r.history) for r in requests] == list(range(5))


async def test_messages_queued_behind_a_running_answer_survive_a_shutdown(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "w " * 300 if r.query == "long" else default_reply(r), token_delay=0.01)
    queued = [msg("long"), msg("b"), msg("c"), msg("d")]
    async with bot_stack(tmp_path, gen, shutdown_grace_s=0.05) as stack:
        for message in queued:
            await stack.bot.submit(message, RecordingReply(message.text))
        await asyncio.to_thread(gen.started.wait, 5)
        await stack.bot.drain(0.05)  # SIGTERM with a short grace: everything is left resumable
        states = [await stack.storage.event_state("slack", m.event_id) for m in queued]
        assert [s.status for s in states if s is not None] == [
            EventStatus.GENERATING,
            EventStatus.RECEIVED,
            EventStatus.RECEIVED,
            EventStatus.RECEIVED,
        ]
    gen.reply = default_reply
    gen.token_delay = 0.0
    async with bot_stack(tmp_path, gen) as stack:
        adapter = FakeAdapter()
        stack.bot.attach(adapter)
        assert await stack.bot.start() == 4
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in adapter.replies)), 10)
        turns = await stack.storage.recent_turns(CHANNEL, 10)
    assert [t.user for t in turns] == ["long", "b", "c", "d"]
    assert adapter.handles[0] == {"reply": "long"}  # the long answer goes on in its own message
    assert [r.final for r in adapter.replies][1:] == [
        ("finish", f"Answer {i} to: {text}") for i, text in ((2, "b"), (3, "c"), (4, "d"))
    ]


async def test_shutdown_lets_an_answer_within_the_grace_finish(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "w " * 20, token_delay=0.01)
    async with bot_stack(tmp_path, gen) as stack:
        reply = RecordingReply()
        await stack.bot.submit(msg("hello"), reply)
        await asyncio.to_thread(gen.started.wait, 5)
        await stack.bot.drain(5.0)
        assert reply.final == ("finish", ("w " * 20).strip())
        assert not stack.bot.accepting
        late = RecordingReply("late")
        assert await stack.bot.submit(msg("too late"), late) is Outcome.DEFERRED
        assert late.calls == []


class FlakyFinish(RecordingReply):
    def __init__(self, failures: list[DeliveryError]) -> None:
        super().__init__()
        self.failures = failures

    async def finish(self, text: str) -> None:
        if self.failures:
            self.calls.append(("refused", text))
            raise self.failures.pop(0)
        await super().finish(text)


async def test_a_transiently_refused_final_text_is_retried_until_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "DELIVERY_FIRST_RETRY_S", 0.01)
    async with bot_stack(tmp_path) as stack:
        message = msg("hello")
        reply = FlakyFinish(
            [
                DeliveryError("HTTP 503", transient=True),
                DeliveryError("429", transient=True, retry_after=0.02),
            ]
        )
        assert await stack.bot.handle(message, reply) is Outcome.ANSWERED
        state = await stack.storage.event_state("slack", message.event_id)
    assert [kind for kind, _ in reply.calls] == ["begin", "refused", "refused", "finish"]
    assert reply.final == ("finish", "Answer 1 to: hello")
    assert state is not None and (state.status, state.attempts) == (EventStatus.DELIVERED, 2)


async def test_a_delivery_retried_after_the_adapter_reconnected_goes_through_the_new_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "DELIVERY_FIRST_RETRY_S", 0.05)
    adapter = FakeAdapter()
    async with bot_stack(tmp_path) as stack:
        stack.bot.attach(adapter)
        message = msg("hello")
        # The old connection's reply can never finish (its client is closed).
        old = FlakyFinish([DeliveryError("session closed", transient=True) for _ in range(20)])
        handling = asyncio.create_task(stack.bot.handle(message, old))
        for _ in range(200):
            if ("refused", "Answer 1 to: hello") in old.calls:
                break
            await asyncio.sleep(0.01)
        stack.bot.attach(adapter)  # the supervisor restarted it: a new connection
        assert await asyncio.wait_for(handling, 10) is Outcome.ANSWERED
        state = await stack.storage.event_state("slack", message.event_id)
    assert adapter.handles == [{"reply": "reply"}]  # rebuilt from the handle the old one stored
    [new] = adapter.replies
    assert new.final == ("finish", "Answer 1 to: hello")
    assert old.final is None and state is not None and state.status is EventStatus.DELIVERED


async def test_a_permanently_refused_final_text_gets_one_honest_note(tmp_path: Path) -> None:
    async with bot_stack(tmp_path) as stack:
        message = msg("hello")
        reply = FlakyFinish([DeliveryError("error: msg_too_long", transient=False)])
        await stack.bot.handle(message, reply)
        state = await stack.storage.event_state("slack", message.event_id)
    assert reply.final == ("fail", "I could not show this answer (error: msg_too_long).")
    assert state is not None and state.status is EventStatus.FAILED


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
        self._ids = itertools.count(1)

    async def record_event(self, platform: str, event_id: str, conversation: str, payload: Any) -> Claim:
        event = StoredEvent(
            next(self._ids), platform, event_id, conversation, EventStatus.RECEIVED, "me", payload,
            None, None, None, 0, datetime.now(UTC),
        )  # fmt: skip
        return Claim(ClaimResult.NEW, event)

    async def nearest_unanswered_before(self, event: StoredEvent) -> None:
        return None

    async def has_history(self, channel: ChannelRef) -> bool:
        return True

    async def set_status(self, event: StoredEvent, status: EventStatus, **_: object) -> bool:
        return True

    async def save_final(self, event: StoredEvent, text: str, kind: FinalKind) -> bool:
        return True

    async def save_reply_handle(self, event: StoredEvent, handle: object) -> bool:
        return True

    async def recent_turns(self, channel: ChannelRef, limit: int) -> list[object]:
        return []

    async def append_turn(self, channel: ChannelRef, **turn: object) -> None:
        pass

    async def clear(self, channel: ChannelRef, **event: object) -> int:
        self.cleared.append(channel)
        return 0


async def test_without_permission_no_text_resets(tmp_path: Path) -> None:
    """Whatever the text, a message the platform marks ``may_reset=False`` never clears the
    conversation; the ones the core reads as a reset get the refusal."""
    texts = reset_like_texts(5000)
    asked = {text for text in texts if read_command(clean_user_text(text)) is Command.RESET}
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
