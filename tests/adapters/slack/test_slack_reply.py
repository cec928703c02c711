"""SlackReply on fake clients: the edit floor on a fake clock (exactly which updates reach Slack, at
any machine speed), the handle, resuming on stored messages, and refusals as DeliveryError."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_reply import PLACEHOLDER, SlackReply
from bot.events import DeliveryError


class ManualClock:
    """A fake ``time.monotonic`` that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingClient:
    """The two Web API methods SlackReply calls, recording (method, text) and answering ok."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def chat_postMessage(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("post", kwargs["text"]))
        return {"ok": True, "ts": f"1700000000.{len(self.calls):06d}"}

    async def chat_update(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("update", kwargs["text"]))
        return {"ok": True, "ts": kwargs["ts"]}


def reply_on(clock: ManualClock, client: RecordingClient, interval: float = 1.0) -> SlackReply:
    return SlackReply(cast(AsyncWebClient, client), "C1", "1.0", min_edit_interval=interval, clock=clock)


async def test_updates_inside_the_interval_are_dropped_and_the_next_one_after_it_is_shown() -> None:
    clock, client = ManualClock(), RecordingClient()
    reply = reply_on(clock, client)
    await reply.begin()  # the placeholder is a write at 100.0
    for now, text in [
        (100.5, "a"),
        (100.99, "a b"),
        (101.0, "a b c"),
        (101.75, "a b c d"),
        (102.0, "a b c d e"),
    ]:
        clock.now = now
        await reply.update(text)
    clock.now = 103.0  # a full interval after the last edit: finish does not wait
    await reply.finish("a b c d e f")
    assert client.calls == [
        ("post", PLACEHOLDER),
        ("update", "a b c"),  # 1.0 s after the placeholder
        ("update", "a b c d e"),  # 1.0 s after that edit
        ("update", "a b c d e f"),
    ]


async def test_whitespace_only_updates_never_replace_the_placeholder() -> None:
    clock, client = ManualClock(), RecordingClient()
    reply = reply_on(clock, client, interval=0.25)
    await reply.begin()
    clock.now += 5.0
    await reply.update("   ")
    await reply.update("hi")
    assert client.calls == [("post", PLACEHOLDER), ("update", "hi")]


class ThreadClient(RecordingClient):
    """Also deletes, and refuses every chat.update with ``refuse`` (a Slack error code) if set."""

    def __init__(self, refuse: tuple[int, str] | None = None) -> None:
        super().__init__()
        self.refuse = refuse

    async def chat_update(self, **kwargs: Any) -> dict[str, Any]:
        if self.refuse is not None:
            status, code = self.refuse
            raise SlackApiError(
                "refused", SimpleNamespace(status_code=status, data={"ok": False, "error": code})
            )  # type: ignore[no-untyped-call]
        self.calls.append(("update", f"{kwargs['ts']} {kwargs['text']}"))
        return {"ok": True, "ts": kwargs["ts"]}

    async def chat_delete(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("delete", kwargs["ts"]))
        return {"ok": True}


def resumed(client: RecordingClient, posted: list[str]) -> SlackReply:
    return SlackReply(
        cast(AsyncWebClient, client), "C1", "1.0", min_edit_interval=0.0, clock=ManualClock(), posted=posted
    )


async def test_the_handle_names_the_thread_and_every_message_shown() -> None:
    client = ThreadClient()
    reply = resumed(client, [])
    assert reply.handle is None  # nothing posted yet
    await reply.begin()
    await reply.finish("x " * 3000)  # two messages
    assert reply.handle == {
        "channel": "C1",
        "thread_ts": "1.0",
        "ts": ["1700000000.000001", "1700000000.000003"],
    }


async def test_a_resumed_reply_edits_the_stored_messages_and_deletes_the_extra_ones() -> None:
    client = ThreadClient()
    reply = resumed(client, ["5.1", "5.2", "5.3"])  # an earlier run's longer partial answer
    await reply.begin()  # its placeholder exists already: nothing is posted
    await reply.finish("the answer")
    assert client.calls == [("update", "5.1 the answer"), ("delete", "5.3"), ("delete", "5.2")]
    assert reply.handle == {"channel": "C1", "thread_ts": "1.0", "ts": ["5.1"]}


async def test_a_resumed_reply_that_fails_turns_its_first_message_into_the_note() -> None:
    client = ThreadClient()
    reply = resumed(client, ["5.1", "5.2"])
    await reply.fail("busy")
    assert client.calls == [("update", "5.1 :warning: busy"), ("delete", "5.2")]


@pytest.mark.parametrize(
    ("refusal", "transient"),
    [((500, "fatal_error"), True), ((429, "ratelimited"), True), ((200, "msg_too_long"), False)],
)
async def test_a_refused_final_text_raises_a_delivery_error(
    refusal: tuple[int, str], transient: bool
) -> None:
    client = ThreadClient(refuse=refusal)
    reply = resumed(client, ["5.1"])
    with pytest.raises(DeliveryError) as refused:
        await reply.finish("the answer")
    assert refused.value.transient is transient
    assert refused.value.reason.endswith(f"error: {refusal[1]}")
    assert client.calls == []  # nothing was posted instead: the core retries on the same message
