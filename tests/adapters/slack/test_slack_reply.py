"""SlackReply's edit floor on a fake clock: exactly which updates reach Slack, at any machine speed."""

from __future__ import annotations

from typing import Any, cast

from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_reply import PLACEHOLDER, SlackReply


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
