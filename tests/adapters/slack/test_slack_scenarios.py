"""Issue 3's scenarios: the real slack-bolt app and the real core against a fake Slack on 127.0.0.1.

Tests never sleep to synchronise. To show that something did *not* happen (no answer, no Web
API call), a later "barrier" event is sent and awaited: events are handled in arrival order
on one inference thread, so once the barrier is answered anything earlier would have been too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters import slack_adapter, slack_reply
from adapters.slack_adapter import SLASH_COMMAND, SlackAdapter
from adapters.slack_events import to_message
from adapters.slack_reply import MESSAGE_BYTES, PLACEHOLDER, escape
from bot import core, metrics
from bot.config import ConfigError
from bot.events import ChannelRef, PlatformUnreachable
from bot.generation import GenerationRequest
from storage.repository import Storage, StoredEvent
from tests.adapters.slack.fake_slack import (
    BOT_TOKEN,
    BOT_USER_ID,
    SIGNING_SECRET,
    FakeSlack,
    event_body,
    mention,
    message,
    new_ts,
    sign,
)
from tests.adapters.slack.harness import SlackRig, slack_rig
from tests.support import ScriptedGenerator, make_settings

ACK_BOUND_S = 0.5  # the target is 100 ms; generous so a loaded 2-core CI box never flakes


def answered(fake: FakeSlack, channel: str, thread_ts: str | None, text: str) -> bool:
    return text in fake.thread_text(channel, thread_ts)


async def barrier(rig: SlackRig, channel: str = "CBARRIER") -> None:
    """Send a fresh mention and wait for its answer (see the module docstring)."""
    event = mention("barrier", channel=channel)
    await deliver(rig, event_body(event))
    await rig.fake.wait_for(lambda: answered(rig.fake, channel, event["ts"], "Answer 1 to: barrier"))


async def deliver(rig: SlackRig, body: dict[str, object], retry: int = 0) -> None:
    """Deliver one event the way the rig's mode does, and check Slack got its ack."""
    if rig.http is not None:
        status, _ = await rig.post(body, retry=retry)
        assert status == 200
    else:
        envelope_id, _ = await rig.fake.send_envelope(body, retry_attempt=retry)
        await rig.fake.wait_ack(envelope_id)


async def settled(storage: Storage, event_id: str, status: str) -> StoredEvent:
    """The Slack event's stored state once it has ``status`` (set just after the platform's answer)."""
    for _ in range(250):
        state = await storage.event_state("slack", event_id)
        if state is not None and state.status == status:
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"event {event_id} is {state.status if state else 'not recorded'}, not {status}")


def answers_to(generator: ScriptedGenerator, query: str) -> int:
    return sum(1 for request in generator.requests if request.query == query)


@pytest.fixture(params=["http", "socket"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- answering -------------------------------------------------------------------------------


async def test_mention_streams_placeholder_then_updates_then_the_model_text(
    tmp_path: Path, fake: FakeSlack, mode: str
) -> None:
    words = " ".join(f"word{i}" for i in range(30))
    generator = ScriptedGenerator(lambda request: f"{request.query}: {words}", token_delay=0.02)
    async with slack_rig(tmp_path, fake, generator, socket_mode=mode == "socket") as rig:
        event = mention("stream please")
        await deliver(rig, event_body(event))
        expected = f"stream please: {words}"
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], expected))

        [reply] = fake.thread("C1", event["ts"])  # one message, in the mention's thread
        assert reply.edits[0] == PLACEHOLDER
        assert reply.edits[-1] == expected  # exactly what the model produced
        partial = reply.edits[1:-1]
        assert partial, "no streamed update before the final text"
        assert all(expected.startswith(text) and text != expected for text in partial)
        updates = [call.at for call in fake.calls_to("chat.update")]
        assert len(updates) == len(reply.edits) - 1


async def test_a_message_is_edited_at_most_once_per_interval(tmp_path: Path, fake: FakeSlack) -> None:
    words = " ".join(f"w{i}" for i in range(80))
    generator = ScriptedGenerator(lambda request: words, token_delay=0.01)
    # The core would pass every token on (stream_interval 0); the adapter still holds its floor.
    async with slack_rig(tmp_path, fake, generator, edit_interval=0.25, stream_interval=0.0) as rig:
        event = mention("throttle")
        await deliver(rig, event_body(event))
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], words))
        writes = [call.at for call in fake.writes]  # placeholder post, then every edit
        gaps = [later - earlier for earlier, later in itertools.pairwise(writes)]
        assert len(gaps) >= 2
        assert min(gaps) > 0.2, gaps


async def test_second_mention_in_the_thread_continues_the_conversation(
    tmp_path: Path, fake: FakeSlack
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        first = mention("first question")
        await deliver(rig, event_body(first))
        await fake.wait_for(lambda: answered(fake, "C1", first["ts"], "Answer 1 to: first question"))

        second = mention("second question", thread_ts=first["ts"])
        await deliver(rig, event_body(second))
        await fake.wait_for(lambda: answered(fake, "C1", first["ts"], "Answer 2 to: second question"))
        assert rig.stack.generator.requests[-1].history == (
            ("first question", "Answer 1 to: first question"),
        )

        # A new top-level mention is a new thread, so a new conversation.
        other = mention("other question")
        await deliver(rig, event_body(other))
        await fake.wait_for(lambda: answered(fake, "C1", other["ts"], "Answer 1 to: other question"))


async def test_direct_messages_are_one_conversation_per_dm_and_threads_their_own(
    tmp_path: Path, fake: FakeSlack
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        await deliver(rig, event_body(message("hi", channel="D1", channel_type="im")))
        await fake.wait_for(lambda: answered(fake, "D1", None, "Answer 1 to: hi"))
        await deliver(rig, event_body(message("again", channel="D1", channel_type="im")))
        await fake.wait_for(lambda: answered(fake, "D1", None, "Answer 2 to: again"))

        thread = message("in a thread", channel="D1", channel_type="im", thread_ts="1500000000.000001")
        await deliver(rig, event_body(thread))
        await fake.wait_for(lambda: answered(fake, "D1", "1500000000.000001", "Answer 1 to: in a thread"))
        assert rig.stack.generator.requests[0].query == "hi"


async def test_thread_followups_need_no_mention_once_the_bot_answered_there(
    tmp_path: Path, fake: FakeSlack
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        first = mention("start")
        await deliver(rig, event_body(first))
        await fake.wait_for(lambda: answered(fake, "C1", first["ts"], "Answer 1 to: start"))

        await deliver(rig, event_body(message("and then?", thread_ts=first["ts"])))
        await fake.wait_for(lambda: answered(fake, "C1", first["ts"], "Answer 2 to: and then?"))

        # A thread the bot never answered in, and a plain channel message: not for the bot.
        await deliver(rig, event_body(message("chatting", thread_ts="1400000000.000001")))
        await deliver(rig, event_body(message("top level chatter")))
        await barrier(rig)
        assert answers_to(rig.stack.generator, "chatting") == 0
        assert answers_to(rig.stack.generator, "top level chatter") == 0
        assert fake.thread("C1", "1400000000.000001") == []


async def test_thread_followups_can_be_turned_off(tmp_path: Path, fake: FakeSlack) -> None:
    async with slack_rig(tmp_path, fake, slack_thread_followups=False) as rig:
        first = mention("start")
        await deliver(rig, event_body(first))
        await fake.wait_for(lambda: answered(fake, "C1", first["ts"], "Answer 1 to: start"))
        await deliver(rig, event_body(message("and then?", thread_ts=first["ts"])))
        await barrier(rig)
        assert answers_to(rig.stack.generator, "and then?") == 0


async def test_a_mention_in_a_thread_also_sent_as_a_message_is_answered_once(
    tmp_path: Path, fake: FakeSlack
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        first = mention("start")
        await deliver(rig, event_body(first))
        await fake.wait_for(lambda: answered(fake, "C1", first["ts"], "Answer 1 to: start"))

        both = mention("again", thread_ts=first["ts"])
        as_message = message(both["text"], thread_ts=first["ts"], ts=both["ts"])
        await deliver(rig, event_body(as_message))
        await deliver(rig, event_body(both))
        await fake.wait_for(lambda: answered(fake, "C1", first["ts"], "Answer 2 to: again"))
        await barrier(rig)
        assert answers_to(rig.stack.generator, "again") == 1
        assert len(fake.thread("C1", first["ts"])) == 2


async def test_mentions_become_names_and_the_bot_mention_is_stripped(tmp_path: Path, fake: FakeSlack) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        event = mention("ask <@U2> about <#C9|general> &amp; <https://example.com|this>")
        await deliver(rig, event_body(event))
        await fake.wait_for(
            lambda: bool(fake.thread("C1", event["ts"])) and rig.stack.generator.requests != []
        )
        assert rig.stack.generator.requests[0].query == (
            "ask @U2-name about #general & this (https://example.com)"
        )


@pytest.mark.parametrize("retry_s", [0.0, 300.0], ids=["after-the-retry-time", "within-it"])
async def test_a_failed_name_lookup_keeps_the_id_and_is_retried_later(
    tmp_path: Path, fake: FakeSlack, monkeypatch: pytest.MonkeyPatch, retry_s: float
) -> None:
    monkeypatch.setattr(slack_adapter, "NAME_RETRY_S", retry_s)
    fake.failures["users.info"] = [(200, {"ok": False, "error": "missing_scope"}, {})]
    async with slack_rig(tmp_path, fake) as rig:
        for number in (1, 2):
            event = mention(f"ask <@U7> {number}", user="U7")
            await deliver(rig, event_body(event))

            def asked(n: int = number) -> bool:
                return len(rig.stack.generator.requests) == n

            await fake.wait_for(asked)
        queries = [request.query for request in rig.stack.generator.requests]
    assert queries[0] == "ask @U7 1"
    if retry_s:
        assert queries[1] == "ask @U7 2" and len(fake.calls_to("users.info")) == 1
    else:
        assert queries[1] == "ask @U7-name 2" and len(fake.calls_to("users.info")) == 2


async def test_own_and_bot_messages_and_edits_are_ignored(tmp_path: Path, fake: FakeSlack) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        dm = {"channel": "D1", "channel_type": "im"}
        ignored = [
            message("from myself", user=BOT_USER_ID, **dm),
            message("from a bot", bot_id="B2", **dm),
            message("a bot message", subtype="bot_message", **dm),
            message("edited", subtype="message_changed", **dm),
            message("deleted", subtype="message_deleted", **dm),
            message("joined", subtype="channel_join"),
        ]
        writes_before = len(fake.writes)
        for event in ignored:
            await deliver(rig, event_body(event))
        await barrier(rig)
        assert rig.stack.generator.requests[-1].query == "barrier"
        assert len(rig.stack.generator.requests) == 1
        assert len(fake.writes) - writes_before == 2  # the barrier's placeholder and final edit


# --- delivery ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda raw: sign(raw, secret="wrong-secret"), id="bad-signature"),
        pytest.param(lambda raw: sign(raw, timestamp=int(time.time()) - 600), id="stale-timestamp"),
        pytest.param(lambda raw: {"Content-Type": "application/json"}, id="unsigned"),
    ],
)
async def test_bad_or_stale_signatures_get_401_and_reach_nothing(
    tmp_path: Path, fake: FakeSlack, headers: object
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        calls_before = len(fake.calls)
        body = event_body(mention("forged"))
        status, _ = await rig.post(body, headers=headers(json.dumps(body)))  # type: ignore[operator]
        assert status == 401
        assert len(fake.calls) == calls_before  # zero Web API calls
        await barrier(rig)
        assert answers_to(rig.stack.generator, "forged") == 0


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"{not json"], ids=["non-utf8", "bad-json"])
async def test_a_bad_signature_is_401_before_the_body_is_parsed(
    tmp_path: Path, fake: FakeSlack, raw: bytes
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        assert rig.http is not None
        calls_before = len(fake.calls)
        headers = sign(raw, secret="wrong-secret")
        response = await rig.http.post("/slack/events", data=raw, headers=headers)
        assert response.status == 401
        assert len(fake.calls) == calls_before


@pytest.mark.parametrize(
    "timestamp", ["soon", "", "１２３", None], ids=["word", "empty", "wide-digits", "missing"]
)
async def test_a_non_numeric_or_missing_timestamp_is_401(
    tmp_path: Path, fake: FakeSlack, timestamp: str | None
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        body = event_body(mention("odd clock"))
        headers = sign(json.dumps(body))
        del headers["X-Slack-Request-Timestamp"]
        if timestamp is not None:
            headers["X-Slack-Request-Timestamp"] = timestamp
        status, _ = await rig.post(body, headers=headers)
        assert status == 401
        await barrier(rig)
        assert answers_to(rig.stack.generator, "odd clock") == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            event_body({"type": "reaction_added", "user": "U1", "reaction": "wave", "event_ts": "1.2"}),
            id="unknown-event-type",
        ),
        pytest.param(
            {
                "token": "t",
                "type": "app_rate_limited",
                "team_id": "T1",
                "minute_rate_limited": 1,
                "api_app_id": "A1",
            },
            id="app_rate_limited",
        ),
    ],
)
async def test_unhandled_callbacks_get_200_and_are_ignored(
    tmp_path: Path, fake: FakeSlack, caplog: pytest.LogCaptureFixture, mode: str, body: dict[str, object]
) -> None:
    caplog.set_level(logging.DEBUG, logger=slack_adapter.__name__)
    async with slack_rig(tmp_path, fake, socket_mode=mode == "socket") as rig:
        writes_before = len(fake.writes)
        await deliver(rig, body)  # asserts the 200 (or, in Socket Mode, the ack)
        await barrier(rig)
        assert len(fake.writes) - writes_before == 2  # the barrier's placeholder and final edit
    ignored = [r for r in caplog.records if "no listener handles" in r.getMessage()]
    assert [r.levelno for r in ignored] == [logging.DEBUG]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "nhandled" in r.getMessage()]


async def test_malformed_bodies_get_a_clear_400(tmp_path: Path, fake: FakeSlack) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        assert rig.http is not None
        for raw in (b"\xff\xfe not utf-8", b"{not json"):
            response = await rig.http.post("/slack/events", data=raw, headers=sign(raw))
            assert response.status == 400  # even a validly signed body
            assert (await response.text()).startswith("malformed request: body is not")
        await barrier(rig)


async def test_three_deliveries_of_one_event_give_one_answer(
    tmp_path: Path, fake: FakeSlack, mode: str
) -> None:
    async with slack_rig(tmp_path, fake, socket_mode=mode == "socket") as rig:
        event = mention("retried")
        body = event_body(event)
        await asyncio.gather(*(deliver(rig, body, retry=attempt) for attempt in range(3)))
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], "Answer 1 to: retried"))
        await barrier(rig)
        assert len(fake.thread("C1", event["ts"])) == 1
        assert answers_to(rig.stack.generator, "retried") == 1


async def test_redelivery_after_a_restart_is_not_answered_again(tmp_path: Path, fake: FakeSlack) -> None:
    event = mention("before restart")
    body = event_body(event)
    async with slack_rig(tmp_path, fake) as rig:
        await deliver(rig, body)
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], "Answer 1 to: before restart"))

    async with slack_rig(tmp_path, fake, socket_mode=True) as restarted:
        await deliver(restarted, body, retry=1)
        # An event the first process never saw is answered by the second.
        await barrier(restarted)
        assert answers_to(restarted.stack.generator, "before restart") == 0
        assert len(fake.thread("C1", event["ts"])) == 1


async def test_forty_mentions_in_forty_channels_get_forty_answers(tmp_path: Path, fake: FakeSlack) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        events = [mention(f"question {i}", channel=f"C{i:03d}") for i in range(40)]
        await asyncio.gather(*(deliver(rig, event_body(event)) for event in events))

        def all_answered() -> bool:
            return all(
                answered(fake, f"C{i:03d}", event["ts"], f"Answer 1 to: question {i}")
                for i, event in enumerate(events)
            )

        await fake.wait_for(all_answered, deadline_s=30)
        for i, event in enumerate(events):
            assert len(fake.thread(f"C{i:03d}", event["ts"])) == 1
        assert len(rig.stack.generator.requests) == 40
        assert len(fake.calls_to("chat.postMessage")) == 40


async def test_a_12000_character_answer_is_split_into_thread_replies(tmp_path: Path, fake: FakeSlack) -> None:
    paragraph = "Sentence with <tags> & ampersands, and more words to fill. " * 8
    code = "```python\n" + "\n".join(f"    value_{i} = {i} << 2  # shift" for i in range(60)) + "\n```"
    answer = "\n\n".join([paragraph] * 12 + [code] + [paragraph] * 16)
    answer = answer[:12000].rstrip()
    assert len(answer) >= 11_900
    generator = ScriptedGenerator(lambda request: answer, max_context_tokens=8192)
    # The answer is ~2,000 words.
    room: dict[str, Any] = {"max_new_tokens": 4096, "max_context_tokens": 8192}
    async with slack_rig(tmp_path, fake, generator, **room) as rig:
        event = mention("long one")
        await deliver(rig, event_body(event))
        expected = _words(answer)
        await fake.wait_for(lambda: _words("\n".join(fake.thread_text("C1", event["ts"]))) == expected)
        texts = fake.thread_text("C1", event["ts"])
        assert len(texts) >= 4  # 12,000+ escaped bytes need at least four 3,500-byte messages
        for text in texts:
            assert len(text.encode("utf-8")) <= MESSAGE_BYTES
            assert sum(1 for line in text.split("\n") if line.startswith("```")) % 2 == 0
            assert "<" not in text
        for text in texts[:-1]:
            assert text.endswith((".", "```")), text[-40:]  # cut at a sentence or a code line


async def test_model_output_cannot_ping_or_link(tmp_path: Path, fake: FakeSlack) -> None:
    hostile = "<!channel> <!here> <!everyone> <@U999> <#C999> <https://evil.example|click> & done"
    generator = ScriptedGenerator(lambda request: hostile)
    async with slack_rig(tmp_path, fake, generator) as rig:
        event = mention("be nasty")
        await deliver(rig, event_body(event))
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], escape(hostile)))
        for call in fake.writes:
            assert "<" not in call.params["text"] and ">" not in call.params["text"]
        assert fake.thread_text("C1", event["ts"]) == [
            "&lt;!channel&gt; &lt;!here&gt; &lt;!everyone&gt; &lt;@U999&gt; &lt;#C999&gt; "
            "&lt;https://evil.example|click&gt; &amp; done"
        ]


async def test_acks_stay_fast_while_a_long_generation_runs(
    tmp_path: Path, fake: FakeSlack, mode: str
) -> None:
    release = threading.Event()

    def reply(request: GenerationRequest) -> str:
        if request.query == "long":
            release.wait(30)  # the inference thread stays busy until the acks are measured
        return "done"

    generator = ScriptedGenerator(reply)
    async with slack_rig(tmp_path, fake, generator, socket_mode=mode == "socket") as rig:
        await deliver(rig, event_body(mention("long")))
        assert await asyncio.to_thread(generator.started.wait, 10)
        latencies = []
        events = [mention(f"meanwhile {i}", channel=f"CM{i}") for i in range(10)]
        for event in events:
            if rig.http is not None:
                status, seconds = await rig.post(event_body(event))
                assert status == 200
            else:
                envelope_id, sent = await fake.send_envelope(event_body(event))
                seconds = await fake.wait_ack(envelope_id) - sent
            latencies.append(seconds)
        release.set()
        assert max(latencies) < ACK_BOUND_S, latencies
        # Every message acknowledged while the model was busy is answered once it is free.
        await fake.wait_for(lambda: all(answered(fake, e["channel"], e["ts"], "done") for e in events))


async def test_stop_leaves_an_answer_in_flight_resumable_and_the_next_start_finishes_it_in_place(
    tmp_path: Path, fake: FakeSlack
) -> None:
    release = threading.Event()
    generator = ScriptedGenerator(lambda request: "never shown" if release.wait(30) else "")
    async with slack_rig(tmp_path, fake, generator) as rig:
        event = mention("cut short")
        body = event_body(event)
        await deliver(rig, body)
        assert await asyncio.to_thread(generator.started.wait, 10)
        try:
            await asyncio.wait_for(rig.stack.bot.drain(0), 5)  # the shutdown grace is over
        finally:
            release.set()  # lets the inference thread go, so the model service can close
        # No "cancelled" note: the answer is left for the next start.
        [placeholder] = fake.thread("C1", event["ts"])
        assert placeholder.text == PLACEHOLDER
        state = await rig.stack.storage.event_state("slack", body["event_id"])
        assert state is not None and state.status == "generating"

    async with slack_rig(tmp_path, fake) as restarted:
        assert await restarted.stack.bot.start() == 1
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], "Answer 1 to: cut short"))
        [answer] = fake.thread("C1", event["ts"])
        assert answer.ts == placeholder.ts  # the same message, edited: nothing posted twice
        assert len(fake.calls_to("chat.postMessage")) == 1
        await settled(restarted.stack.storage, body["event_id"], "delivered")


async def test_reply_for_a_stored_handle_edits_its_messages_and_deletes_the_extra_ones(
    tmp_path: Path, fake: FakeSlack
) -> None:
    """What a restart resumes: an earlier run showed a long partial answer in three messages."""
    async with slack_rig(tmp_path, fake) as rig:
        thread_ts = new_ts()
        shown = [await post_in(rig, "C1", thread_ts, f"earlier part {i}") for i in range(3)]
        question = to_message(
            event_body(mention("again", channel="C1", ts=thread_ts)), BOT_USER_ID, {}, thread_followups=True
        )
        assert question is not None
        reply = rig.adapter.reply_for(question, {"channel": "C1", "thread_ts": thread_ts, "ts": shown})
        assert reply is not None and reply.handle == {"channel": "C1", "thread_ts": thread_ts, "ts": shown}
        posts = len(fake.calls_to("chat.postMessage"))
        await reply.begin()  # the stored messages are the placeholder
        await reply.finish("the whole answer, short")
        assert [(m.ts, m.text) for m in fake.thread("C1", thread_ts)] == [
            (shown[0], "the whole answer, short")
        ]
        assert len(fake.calls_to("chat.postMessage")) == posts  # nothing posted anew
        assert [c.params["ts"] for c in fake.calls_to("chat.delete")] == [shown[2], shown[1]]
        assert reply.handle == {"channel": "C1", "thread_ts": thread_ts, "ts": shown[:1]}

        # Without a handle nothing was shown yet: begin() posts the placeholder in the thread.
        fresh = rig.adapter.reply_for(question, None)
        assert fresh is not None and fresh.handle is None
        # A slash command's ephemeral answer (response_url) cannot be resumed.
        ephemeral = replace(question, raw={**question.raw, "ephemeral": True})
        assert rig.adapter.reply_for(ephemeral, None) is None


async def post_in(rig: SlackRig, channel: str, thread_ts: str, text: str) -> str:
    """A bot message in the thread, posted as an earlier run would have."""
    posted = await rig.adapter._client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text)
    return str(posted["ts"])


# --- slash command ------------------------------------------------------------------------------


def command_fields(fake: FakeSlack, text: str, channel: str = "C1") -> dict[str, str]:
    return {
        "command": "/chatglm",
        "text": text,
        "user_id": "U1",
        "user_name": "alice",
        "channel_id": channel,
        "team_id": "T1",
        "trigger_id": f"trigger-{text}-{channel}",
        "response_url": f"{fake.base_url}/respond/1",
        "api_app_id": "A1",
    }


async def run_command(rig: SlackRig, text: str) -> None:
    """Invoke /chatglm over HTTP (a signed form post) or Socket Mode (a slash_commands envelope)."""
    fields = command_fields(rig.fake, text)
    if rig.http is None:
        envelope_id, _ = await rig.fake.send_envelope(fields, kind="slash_commands")
        await rig.fake.wait_ack(envelope_id)
        return
    raw = urllib.parse.urlencode(fields)
    headers = {**sign(raw), "Content-Type": "application/x-www-form-urlencoded"}
    response = await rig.http.post("/slack/events", data=raw, headers=headers)
    assert response.status == 200


async def test_slash_help_is_answered_ephemerally(tmp_path: Path, fake: FakeSlack, mode: str) -> None:
    async with slack_rig(tmp_path, fake, socket_mode=mode == "socket") as rig:
        await run_command(rig, "help")
        await fake.wait_for(lambda: len(fake.responses) == 1)
        [response] = fake.responses
        assert response["response_type"] == "ephemeral"
        assert "reset" in response["text"]
        assert fake.writes == []


async def test_slash_prompt_is_quoted_and_answered_in_the_quotes_thread(
    tmp_path: Path, fake: FakeSlack
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        await run_command(rig, "what is <b>?")
        await fake.wait_for(lambda: len(fake.messages) == 2 and "Answer 1" in fake.writes[-1].params["text"])
        [quote] = fake.thread("C1", None)
        assert quote.text == "<@U1> asked: what is &lt;b&gt;?"
        assert fake.thread_text("C1", quote.ts) == ["Answer 1 to: what is &lt;b&gt;?"]


@pytest.mark.usefixtures("quick_retries")
@pytest.mark.parametrize(
    ("failure", "said"),
    [
        ((200, {"ok": False, "error": "not_in_channel"}, {}), "Invite me first"),
        ((502, "Bad Gateway", {"Content-Type": "text/plain"}), "(HTTP 502, non-JSON body)"),
    ],
    ids=["not-in-channel", "bad-gateway"],
)
async def test_a_refused_slash_quote_is_explained_truthfully(
    tmp_path: Path, fake: FakeSlack, failure: tuple[int, dict[str, object] | str, dict[str, str]], said: str
) -> None:
    fake.failures["chat.postMessage"] = [failure] * 10
    async with slack_rig(tmp_path, fake) as rig:
        await run_command(rig, "hello?")
        await fake.wait_for(lambda: len(fake.responses) == 1)
        [response] = fake.responses
        assert response["text"].startswith(":warning:") and said in response["text"]
        assert ("Invite me first" in response["text"]) is (said == "Invite me first")


# --- Web API errors -----------------------------------------------------------------------------


async def test_rate_limited_updates_are_retried_after_retry_after(tmp_path: Path, fake: FakeSlack) -> None:
    fake.failures["chat.update"] = [(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "0"})]
    async with slack_rig(tmp_path, fake) as rig:
        event = mention("limited")
        await deliver(rig, event_body(event))
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], "Answer 1 to: limited"))
        updates = fake.calls_to("chat.update")
        assert len(updates) == 2 and updates[0].params == updates[1].params


async def test_web_api_errors_are_logged_without_tokens_and_the_bot_goes_on(
    tmp_path: Path, fake: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    fake.failures["chat.postMessage"] = [(200, {"ok": False, "error": "channel_not_found"}, {})] * 2
    caplog.set_level(logging.DEBUG)
    async with slack_rig(tmp_path, fake) as rig:
        event = mention("lost", channel="CGONE")
        await deliver(rig, event_body(event))
        await barrier(rig)
    assert "channel_not_found" in caplog.text
    for secret in (BOT_TOKEN, SIGNING_SECRET):
        assert secret not in caplog.text


async def test_a_refused_final_edit_gives_exactly_one_could_not_show_note(
    tmp_path: Path, fake: FakeSlack
) -> None:
    fake.failures["chat.update"] = [(200, {"ok": False, "error": "msg_too_long"}, {})] * 50
    # An interval longer than the answer takes: no streamed edit, only the final one.
    async with slack_rig(tmp_path, fake, edit_interval=1.0) as rig:
        event = mention("uneditable")
        body = event_body(event)
        await deliver(rig, body)
        await fake.wait_for(lambda: len(fake.thread("C1", event["ts"])) == 2)
        fake.failures["chat.update"].clear()
        await barrier(rig)  # nothing more (a retry, a second note) was on its way
        placeholder, note = fake.thread_text("C1", event["ts"])
        assert placeholder == PLACEHOLDER
        assert note == ":warning: I could not show this answer (error: msg_too_long)."
        # A permanent refusal is not retried (the barrier's own edit aside).
        assert len([c for c in fake.calls_to("chat.update") if c.params["channel"] == "C1"]) == 1
        await settled(rig.stack.storage, body["event_id"], "failed")


async def test_a_text_plain_200_on_the_final_edit_gives_a_note_not_a_crash(
    tmp_path: Path, fake: FakeSlack
) -> None:
    fake.failures["chat.update"] = [(200, "ok", {"Content-Type": "text/plain"})] * 50
    async with slack_rig(tmp_path, fake, edit_interval=1.0) as rig:  # only the final edit
        event = mention("plain ok")
        await deliver(rig, event_body(event))
        await fake.wait_for(lambda: len(fake.thread("C1", event["ts"])) == 2)
        fake.failures["chat.update"].clear()
        await barrier(rig)  # nothing more (a retry, a second note) was on its way
        placeholder, note = fake.thread_text("C1", event["ts"])
        assert placeholder == PLACEHOLDER
        assert note == ":warning: I could not show this answer (non-JSON body)."


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slack_reply, "RETRY_BASE_S", 0.01)


@pytest.mark.usefixtures("quick_retries")
async def test_a_text_plain_502_on_an_edit_is_retried_and_the_answer_completes(
    tmp_path: Path, fake: FakeSlack
) -> None:
    fake.failures["chat.update"] = [(502, "Bad Gateway", {"Content-Type": "text/plain"})]
    async with slack_rig(tmp_path, fake) as rig:
        event = mention("through a proxy")
        await deliver(rig, event_body(event))
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], "Answer 1 to: through a proxy"))
        await barrier(rig)
        assert fake.thread_text("C1", event["ts"]) == ["Answer 1 to: through a proxy"]
        first, second = fake.calls_to("chat.update")[:2]
        assert first.params == second.params  # the refused edit, sent again


@pytest.mark.usefixtures("quick_retries")
@pytest.mark.parametrize("content_type", ["text/html", "text/plain", "application/json"])
async def test_a_permanent_non_json_500_gives_one_note_and_the_bot_goes_on(
    tmp_path: Path,
    fake: FakeSlack,
    caplog: pytest.LogCaptureFixture,
    content_type: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 5xx is transient: the core retries the delivery, here 3 times (quickly), then gives up.
    monkeypatch.setattr(core, "DELIVERY_ATTEMPTS", 3)
    monkeypatch.setattr(core, "DELIVERY_FIRST_RETRY_S", 0.01)
    page = "<html><body><h1>500 Internal Server Error</h1></body></html>"
    fake.failures["chat.update"] = [(500, page, {"Content-Type": content_type})] * 100
    counted = metrics.PLATFORM_API_ERRORS.labels("slack", "chat.update", "500")
    before = counted._value.get()
    caplog.set_level(logging.WARNING, logger=slack_reply.__name__)
    async with slack_rig(tmp_path, fake, edit_interval=1.0) as rig:  # only the final edit
        event = mention("doomed")
        body = event_body(event)
        await deliver(rig, body)
        await fake.wait_for(lambda: len(fake.thread("C1", event["ts"])) == 2)
        placeholder, note = fake.thread_text("C1", event["ts"])
        assert placeholder == PLACEHOLDER
        assert note == ":warning: I could not show this answer (HTTP 500, non-JSON body)."
        attempts = len(fake.calls_to("chat.update"))
        # Every delivery attempt: the client's bounded tries; three attempts, then given up.
        assert attempts == 3 * (slack_reply.MAX_RETRIES + 1)

        fake.failures["chat.update"].clear()
        await barrier(rig)
        assert len(fake.thread("C1", event["ts"])) == 2  # still exactly one note
        await settled(rig.stack.storage, body["event_id"], "failed")
    failures = [r.getMessage() for r in caplog.records if r.name == slack_reply.__name__]
    assert failures and set(failures) == {"Slack chat.update failed: HTTP 500, non-JSON body"}
    assert len(failures) == 3  # one line per failed delivery attempt, not per try
    assert counted._value.get() - before == len(failures)  # chatglm_bot_platform_api_errors_total
    assert BOT_TOKEN not in caplog.text


@pytest.mark.usefixtures("quick_retries")
async def test_a_transient_refusal_of_the_final_text_is_retried_until_delivered(
    tmp_path: Path, fake: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "DELIVERY_FIRST_RETRY_S", 0.01)
    # One whole attempt's tries (the client's own retries included) fail, then Slack is back.
    outage: tuple[int, dict[str, Any], dict[str, str]] = (
        503,
        {"ok": False, "error": "service_unavailable"},
        {},
    )
    fake.failures["chat.update"] = [outage] * (slack_reply.MAX_RETRIES + 1)
    async with slack_rig(tmp_path, fake, edit_interval=1.0) as rig:  # only the final edit
        event = mention("outage")
        body = event_body(event)
        await deliver(rig, body)
        await fake.wait_for(lambda: answered(fake, "C1", event["ts"], "Answer 1 to: outage"))
        await barrier(rig)
        assert fake.thread_text("C1", event["ts"]) == ["Answer 1 to: outage"]  # no note, no 2nd message
        # The client's tries for the first delivery attempt, then the core's second attempt.
        updates = [c for c in fake.calls_to("chat.update") if c.params["channel"] == "C1"]
        assert len(updates) == slack_reply.MAX_RETRIES + 2
        state = await settled(rig.stack.storage, body["event_id"], "delivered")
        assert state.attempts == 1


async def test_a_failed_generation_turns_the_placeholder_into_a_short_note(
    tmp_path: Path, fake: FakeSlack
) -> None:
    generator = ScriptedGenerator(fail_with=RuntimeError("model exploded"))
    async with slack_rig(tmp_path, fake, generator) as rig:
        event = mention("break")
        await deliver(rig, event_body(event))
        await fake.wait_for(
            lambda: any(t.startswith(":warning:") for t in fake.thread_text("C1", event["ts"]))
        )
        [note] = fake.thread_text("C1", event["ts"])  # the placeholder itself became the note
        assert "model exploded" not in note and len(note) < 200


async def test_a_wrong_app_token_fails_start_clearly(tmp_path: Path, fake: FakeSlack) -> None:
    with pytest.raises(ConfigError, match="SLACK_APP_TOKEN"):
        async with slack_rig(tmp_path, fake, socket_mode=True, slack_app_token="xapp-wrong"):
            pass


@pytest.mark.usefixtures("quick_retries")
async def test_a_socket_mode_outage_is_unreachable_not_a_rejected_token(
    tmp_path: Path, fake: FakeSlack
) -> None:
    fake.failures["apps.connections.open"] = [(502, "Bad Gateway", {"Content-Type": "text/plain"})] * 10
    with pytest.raises(PlatformUnreachable, match="HTTP 502"):
        async with slack_rig(tmp_path, fake, socket_mode=True):
            pass


def _words(text: str) -> list[str]:
    """Words as the user reads them, without fence lines (the splitter adds some at cuts)."""
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return [w for line in text.split("\n") if not line.startswith("```") for w in line.split()]


# --- setup ----------------------------------------------------------------------------------------


async def test_url_verification_challenge_is_answered(tmp_path: Path, fake: FakeSlack) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        assert rig.http is not None
        raw = json.dumps({"type": "url_verification", "challenge": "c-123", "token": "t"})
        response = await rig.http.post("/slack/events", data=raw, headers=sign(raw))
        assert response.status == 200
        assert "c-123" in await response.text()


async def test_events_before_start_get_503_so_slack_redelivers_them(tmp_path: Path, fake: FakeSlack) -> None:
    settings = make_settings(
        tmp_path, slack_bot_token=BOT_TOKEN, slack_signing_secret=SIGNING_SECRET, slack_api_url=fake.api_url
    )
    http_app = web.Application()
    SlackAdapter(settings, http_app)
    async with TestClient(TestServer(http_app, host="127.0.0.1")) as client:
        raw = json.dumps(event_body(mention("too early")))
        response = await client.post("/slack/events", data=raw, headers=sign(raw))
        assert response.status == 503
        assert response.headers["Retry-After"] == slack_adapter.RETRY_AFTER_S
    assert fake.calls == []


async def test_events_while_shutting_down_get_503_with_retry_after_and_are_not_recorded(
    tmp_path: Path, fake: FakeSlack
) -> None:
    async with slack_rig(tmp_path, fake) as rig:
        assert rig.http is not None
        await rig.stack.bot.drain(0)
        assert not rig.stack.bot.accepting
        event = mention("during the deploy")
        body = event_body(event)
        status, _ = await rig.post(body)
        response = await rig.http.post("/slack/events", data=json.dumps(body), headers=sign(json.dumps(body)))
        assert (status, response.status) == (503, 503)
        assert response.headers["Retry-After"] == slack_adapter.RETRY_AFTER_S
        # Not recorded here: Slack redelivers it to the next process, which answers it.
        assert await rig.stack.storage.event_state("slack", body["event_id"]) is None
        assert fake.writes == []


def test_http_mode_without_a_signing_secret_is_a_config_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, slack_bot_token=BOT_TOKEN)
    with pytest.raises(ConfigError, match="SLACK_SIGNING_SECRET"):
        SlackAdapter(settings, web.Application())


def test_the_manifest_grants_what_the_adapter_uses() -> None:
    manifest = yaml.safe_load(Path(slack_adapter.__file__).with_name("slack_manifest.yaml").read_text())
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert events == {"app_mention", "message.im", "message.channels", "message.groups"}
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert scopes == {
        "app_mentions:read",
        "channels:history",
        "groups:history",
        "im:history",
        "chat:write",
        "users:read",
        "commands",
    }
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == [SLASH_COMMAND]
    assert manifest["features"]["app_home"]["messages_tab_enabled"] is True


async def test_deleting_the_question_cancels_its_answer(tmp_path: Path, fake: FakeSlack) -> None:
    generator = ScriptedGenerator(lambda request: "w " * 2000, token_delay=0.005)
    async with slack_rig(tmp_path, fake, generator) as rig:
        event = mention("never mind")
        await deliver(rig, event_body(event))
        assert await asyncio.to_thread(generator.started.wait, 10)
        deleted = {
            "type": "message",
            "subtype": "message_deleted",
            "channel": "C1",
            "deleted_ts": event["ts"],
            "hidden": True,
            "ts": new_ts(),
        }
        await deliver(rig, event_body(deleted))
        for _ in range(200):
            texts = fake.thread_text("C1", event["ts"])
            if texts and "cancelled" in texts[-1]:
                break
            await asyncio.sleep(0.02)
        assert "cancelled" in fake.thread_text("C1", event["ts"])[-1]
        assert await rig.stack.storage.recent_turns(ChannelRef("slack", "C1", event["ts"]), 5) == []
