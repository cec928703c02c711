"""TransientRetryHandler's decisions, for the faults the fake Slack cannot stage (a dropped
connection, a timeout) and the Retry-After forms a proxy may send."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

from adapters import slack_reply
from adapters.slack_reply import MAX_RETRIES, TransientRetryHandler

REQUEST = HttpRequest(method="POST", url="http://127.0.0.1/api/chat.update", headers={})


def response(
    status: int, body: dict[str, object] | None = None, headers: dict[str, str] | None = None
) -> HttpResponse:
    return HttpResponse(status_code=status, headers={k: [v] for k, v in (headers or {}).items()}, body=body)


async def can_retry(response: HttpResponse | None = None, error: Exception | None = None) -> bool:
    return await TransientRetryHandler().can_retry_async(
        state=RetryState(), request=REQUEST, response=response, error=error
    )


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError(),
        TimeoutError(),
        aiohttp.ServerTimeoutError(),
    ],
)
async def test_connection_errors_and_timeouts_are_retried(error: Exception) -> None:
    assert await can_retry(error=error)


async def test_other_errors_are_not_retried() -> None:
    assert not await can_retry(error=ValueError("a bug, not a fault"))


@pytest.mark.parametrize(("status", "retried"), [(502, True), (400, False)])
async def test_an_unparsable_json_body_is_retried_by_its_status(status: int, retried: bool) -> None:
    # The SDK raises this one itself, holding the raw aiohttp response (``.status``).
    error = SlackApiError("Received a response in a non-JSON format", SimpleNamespace(status=status))  # type: ignore[no-untyped-call]
    assert await can_retry(error=error) is retried


@pytest.mark.parametrize(
    ("status", "body", "retried"),
    [
        (500, None, True),
        (502, None, True),
        (503, {"ok": False, "error": "service_unavailable"}, True),
        (429, {"ok": False, "error": "ratelimited"}, True),
        (200, {"ok": False, "error": "ratelimited"}, True),
        (200, {"ok": False, "error": "msg_too_long"}, False),
        (404, None, False),
    ],
)
async def test_which_responses_are_retried(
    status: int, body: dict[str, object] | None, retried: bool
) -> None:
    assert await can_retry(response(status, body)) is retried


async def test_attempts_are_bounded() -> None:
    state = RetryState()
    state.current_attempt = MAX_RETRIES
    handler = TransientRetryHandler()
    assert not await handler.can_retry_async(state=state, request=REQUEST, response=response(502))


@pytest.mark.parametrize(
    ("retry_after", "slept"),
    [("2", 2.0), ("0", 0.0), ("0.5", 0.5), ("86400", slack_reply.MAX_RETRY_AFTER_S), ("soon", 0.25)],
)
async def test_retry_after_is_honoured_and_capped(
    monkeypatch: pytest.MonkeyPatch, retry_after: str, slept: float
) -> None:
    monkeypatch.setattr(slack_reply, "RETRY_BASE_S", 0.25)
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", record)
    state = RetryState()
    await TransientRetryHandler().prepare_for_next_attempt_async(
        state=state, request=REQUEST, response=response(429, headers={"Retry-After": retry_after})
    )
    assert sleeps == [slept]  # an unreadable value falls back to the backoff
    assert state.next_attempt_requested and state.current_attempt == 1


@pytest.mark.parametrize(
    ("status", "data", "reason", "transient"),
    [
        (200, {"ok": False, "error": "msg_too_long"}, "error: msg_too_long", False),
        (500, {"ok": False}, "HTTP 500, no error code", True),
        (502, "Bad Gateway", "HTTP 502, non-JSON body", True),
        (500, {}, "HTTP 500, non-JSON body", True),  # what the SDK keeps of an HTML page
        (429, {"ok": False, "error": "ratelimited"}, "HTTP 429, error: ratelimited", True),
        (200, {"ok": False, "error": "ratelimited"}, "error: ratelimited", True),
        (404, {"ok": False, "error": "channel_not_found"}, "HTTP 404, error: channel_not_found", False),
    ],
)
async def test_failures_are_named_by_status_and_error_code(
    status: int, data: object, reason: str, transient: bool
) -> None:
    async def refused() -> None:
        raise SlackApiError("refused", SimpleNamespace(status_code=status, data=data))  # type: ignore[no-untyped-call]

    failure = await slack_reply.try_slack("chat.update", refused())
    assert failure == slack_reply.SlackFailure(reason, transient=transient)
    # What the core's delivery retry sees: transient ones are retried, the others given up at once.
    assert isinstance(failure, slack_reply.SlackFailure)
    error = failure.error()
    assert (error.reason, error.transient, error.retry_after) == (reason, transient, None)


async def test_a_refusal_carries_slacks_retry_after_to_the_core() -> None:
    async def limited() -> None:
        headers = {"Retry-After": "7"}
        data = {"ok": False, "error": "ratelimited"}
        raise SlackApiError("limited", SimpleNamespace(status_code=429, data=data, headers=headers))  # type: ignore[no-untyped-call]

    failure = await slack_reply.try_slack("chat.update", limited())
    assert isinstance(failure, slack_reply.SlackFailure)
    assert (failure.transient, failure.error().retry_after) == (True, 7.0)


async def test_no_response_at_all_is_transient() -> None:
    async def dropped() -> None:
        raise aiohttp.ServerDisconnectedError()

    failure = await slack_reply.try_slack("chat.update", dropped())
    assert failure == slack_reply.SlackFailure("no response: ServerDisconnectedError", transient=True)
