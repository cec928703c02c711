"""Neutral reply calls -> Slack Web API calls: a placeholder, edits as text streams, continuation
messages for long answers, and a short note on failure.

Everything the model wrote is escaped (``& < >``) before it reaches Slack, so an answer can never
form ``<!channel>``, ``<!here>``, a user mention or a link. Web API errors are logged (method and
Slack's error code only, never a token). Transient failures (5xx, 429, ``ratelimited``, connection
errors, timeouts) are retried first, by ``TransientRetryHandler`` inside the client; a streamed edit
that still fails is skipped (the next one shows the whole text), while a final text that fails
raises ``DeliveryError`` so the core retries it later, on the same messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from adapters.text import split_message
from bot import metrics
from bot.events import BaseReply, DeliveryError

log = logging.getLogger(__name__)

# Slack accepts up to 40,000 characters but truncates display around 4,000; 3,500 bytes keeps
# every message whole, multi-byte text included.
MESSAGE_BYTES = 3500
PLACEHOLDER = ":hourglass_flowing_sand: _thinking…_"
# Message metadata on every answer's first message names its event, so a bot that died before it
# stored the message's ts can find it again (conversations.replies) instead of posting another.
METADATA_TYPE = "chatglm_bot_answer"
EMPTY_ANSWER = "_(no answer)_"
MAX_RETRIES = 3  # after the first attempt: four in all
RETRY_BASE_S = 0.5  # backoff 0.5, 1, 2 s when Slack gives no Retry-After
MAX_RETRY_AFTER_S = 30.0  # a larger Retry-After is cut to this, so an answer is never held for long


def escape(text: str) -> str:
    """Slack's three control characters as entities; ``&`` first so nothing is escaped twice."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_size(text: str) -> int:
    """How Slack counts a chunk of model output: UTF-8 bytes after escaping."""
    return len(escape(text).encode("utf-8"))


def failure_note(reason: str) -> str:
    return f":warning: {escape(reason)}"


class TransientRetryHandler(AsyncRetryHandler):
    """Retries what may succeed later: 5xx (whatever the body), 429 or ``ratelimited``, connection
    errors and timeouts, honouring Retry-After. Other refusals (``msg_too_long``) are final."""

    def __init__(self) -> None:
        super().__init__(max_retry_count=MAX_RETRIES)

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if isinstance(error, SlackApiError):  # a JSON content type with a body that is not JSON
            return _is_transient(getattr(error.response, "status", None), None)
        if error is not None:
            return isinstance(error, aiohttp.ClientConnectionError | TimeoutError)
        return response is not None and _is_transient(response.status_code, response.body)

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        state.next_attempt_requested = True
        delay = _retry_after(response.headers) if response is not None else None
        await asyncio.sleep(RETRY_BASE_S * 2**state.current_attempt if delay is None else delay)
        state.increment_current_attempt()


def _is_transient(status: object, body: Mapping[str, Any] | None) -> bool:
    if not isinstance(status, int):
        return False
    return status >= 500 or status == 429 or (body is not None and body.get("error") == "ratelimited")


def _retry_after(headers: Mapping[str, list[str] | str]) -> float | None:
    for name, values in headers.items():
        if name.lower() == "retry-after":
            value = values[0] if isinstance(values, list) else values
            try:
                return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                return None  # an HTTP-date or junk: fall back to the backoff
    return None


@dataclass(frozen=True)
class SlackFailure:
    """Why a call failed, in words fit for the log and the user: never a token or a body;
    ``transient`` if it may succeed later (5xx, 429, ``ratelimited``, no response)."""

    reason: str
    transient: bool = False
    retry_after: float | None = None

    def error(self) -> DeliveryError:
        return DeliveryError(self.reason, transient=self.transient, retry_after=self.retry_after)


async def try_slack(method: str, call: Awaitable[Any]) -> Any | SlackFailure:
    """Await one Web API call (retried inside the client); on failure log one line and return why."""
    status: object = 0  # no HTTP answer at all
    try:
        return await call
    except SlackApiError as error:
        status = getattr(error.response, "status_code", getattr(error.response, "status", 0))
        data = getattr(error.response, "data", None)
        body = data if isinstance(data, Mapping) else None
        headers = getattr(error.response, "headers", None) or {}
        failure = SlackFailure(
            api_error_reason(error.response),
            transient=_is_transient(status, body),
            retry_after=_retry_after(headers) if isinstance(headers, Mapping) else None,
        )
    except (aiohttp.ClientError, TimeoutError) as error:
        failure = SlackFailure(f"no response: {type(error).__name__}", transient=True)
    except AttributeError:
        # slack_sdk's own check of a 200 with a text/plain body calls .get on the str.
        failure = SlackFailure("non-JSON body")
        status = 200
    log.warning("Slack %s failed: %s", method, failure.reason)
    metrics.PLATFORM_API_ERRORS.labels("slack", method, str(status)).inc()
    return failure


async def call_slack(method: str, call: Awaitable[Any]) -> Any | None:
    """Like ``try_slack``, but None on failure, for callers that only need to know whether."""
    result = await try_slack(method, call)
    return None if isinstance(result, SlackFailure) else result


def api_error_reason(response: object) -> str:
    # An AsyncSlackResponse whose data is a dict, a str (text/plain) or {} (any other non-JSON
    # content type), or for a JSON content type whose body did not parse, the aiohttp response.
    status = getattr(response, "status_code", getattr(response, "status", None))
    data = getattr(response, "data", None)
    if not isinstance(data, Mapping) or not data:
        detail = "non-JSON body"
    else:
        code = data.get("error")
        detail = f"error: {code}" if isinstance(code, str) and code else "no error code"
    return detail if status == 200 else f"HTTP {status}, {detail}"


class SlackReply(BaseReply):
    """One answer in a thread (or at a DM's top level when ``thread_ts`` is None), shown in one
    or more messages. ``posted`` are the ts of messages an earlier run showed it in (from its
    ``handle``): they are edited, not posted again."""

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        thread_ts: str | None,
        *,
        min_edit_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,  # for the edit interval; tests pass a fake
        posted: list[str] | None = None,
        event_id: str | None = None,
        find_after: str | None = None,
    ) -> None:
        """``event_id`` marks the first message (metadata); with ``find_after`` (a ts), ``begin``
        first looks for that message among the bot's messages after it: one an earlier run posted
        without storing its ts."""
        self._clock = clock
        self._client = client
        self._channel = channel
        self._thread_ts = thread_ts
        self._min_interval = min_edit_interval
        # (ts, escaped text shown) of each message; "" where an earlier run's text is unknown
        self._messages: list[tuple[str, str]] = [(ts, "") for ts in posted or []]
        self._last_write = -float("inf")
        self._shown_text = False  # whether this run's text has replaced the placeholder
        self._refused: SlackFailure | None = None  # the latest write Slack refused
        self._event_id = event_id
        self._find_after = find_after

    @property
    def handle(self) -> dict[str, Any] | None:
        if not self._messages:
            return None
        return {
            "channel": self._channel,
            "thread_ts": self._thread_ts,
            "ts": [ts for ts, _ in self._messages],
        }

    async def begin(self) -> None:
        if not self._messages and self._find_after is not None:
            found = await self._find_posted(self._find_after)
            if found is not None:
                self._messages.append((found, ""))
        if not self._messages:  # a resumed answer already has its placeholder (or partial text)
            await self._post(PLACEHOLDER)

    async def _find_posted(self, after: str) -> str | None:
        """The ts of this answer's first message, if an earlier run posted it (its metadata)."""
        if self._thread_ts is not None:
            call = self._client.conversations_replies(
                channel=self._channel, ts=self._thread_ts, oldest=after, include_all_metadata=True, limit=200
            )
        else:
            call = self._client.conversations_history(
                channel=self._channel, oldest=after, include_all_metadata=True, limit=200
            )
        response = await try_slack("conversations.replies", call)
        if isinstance(response, SlackFailure):
            return None  # e.g. no history scope: post a new one, as before
        for found in response.get("messages") or []:
            metadata = found.get("metadata") if isinstance(found, Mapping) else None
            if (
                isinstance(metadata, Mapping)
                and metadata.get("event_type") == METADATA_TYPE
                and isinstance(metadata.get("event_payload"), Mapping)
                and metadata["event_payload"].get("event_id") == self._event_id
                and isinstance(found.get("ts"), str)
            ):
                return str(found["ts"])
        return None

    async def update(self, text: str) -> None:
        # This guard holds Slack's ~1 edit/s per message whatever the core's stream interval.
        if text.strip() and self._clock() - self._last_write >= self._min_interval:
            await self._show(text)

    async def finish(self, text: str) -> None:
        wait = self._min_interval - (self._clock() - self._last_write)
        if wait > 0:
            await asyncio.sleep(wait)
        if not await self._show(text):
            raise self._failure().error()

    async def fail(self, reason: str) -> None:
        note = failure_note(reason)
        if self._messages and not self._shown_text:
            # The placeholder (or an earlier run's partial text) becomes the note.
            done = await self._edit(0, note)
            while done and len(self._messages) > 1:
                done = await self._delete_last()
        else:
            done = await self._post(note)
        if not done:
            raise self._failure().error()

    def _failure(self) -> SlackFailure:
        return self._refused or SlackFailure("Slack did not take the message", transient=True)

    async def _show(self, text: str) -> bool:
        """Make the thread show ``text``; False if Slack refused part of it."""
        chunks = [escape(chunk) for chunk in split_message(text, MESSAGE_BYTES, measure=slack_size)]
        chunks = chunks or [EMPTY_ANSWER]
        self._shown_text = True
        self._refused = None
        complete = True
        for index, chunk in enumerate(chunks):
            if index >= len(self._messages):
                complete = await self._post(chunk) and complete
            elif self._messages[index][1] != chunk:
                complete = await self._edit(index, chunk) and complete
        # An earlier run's longer partial text (a different sample) left messages this one needs not.
        while complete and len(self._messages) > len(chunks):
            complete = await self._delete_last()
        return complete

    async def _post(self, text: str) -> bool:
        self._last_write = self._clock()
        marked = not self._messages and self._event_id is not None
        metadata = {"event_type": METADATA_TYPE, "event_payload": {"event_id": self._event_id}}
        response = await self._write(
            "chat.postMessage",
            self._client.chat_postMessage(
                channel=self._channel,
                thread_ts=self._thread_ts,
                text=text,
                unfurl_links=False,
                unfurl_media=False,
                metadata=metadata if marked else None,
            ),
        )
        if response is None:
            return False
        if not isinstance(response.get("ts"), str):
            self._refused = SlackFailure("no message ts in the response")
            return False
        self._messages.append((response["ts"], text))
        return True

    async def _edit(self, index: int, text: str) -> bool:
        self._last_write = self._clock()
        ts = self._messages[index][0]
        editing = self._client.chat_update(channel=self._channel, ts=ts, text=text)
        response = await self._write("chat.update", editing)
        if response is None:
            return False
        self._messages[index] = (ts, text)
        return True

    async def _delete_last(self) -> bool:
        ts = self._messages[-1][0]
        deleting = self._client.chat_delete(channel=self._channel, ts=ts)
        response = await self._write("chat.delete", deleting)
        if response is None and (self._refused is None or self._refused.transient):
            return False
        self._messages.pop()  # deleted, or already gone (message_not_found)
        return True

    async def _write(self, method: str, call: Awaitable[Any]) -> Any | None:
        result = await try_slack(method, call)
        if isinstance(result, SlackFailure):
            self._refused = result
            return None
        return result


Respond = Callable[..., Awaitable[Any]]


class SlackEphemeralReply(BaseReply):
    """A slash command's answer, visible only to the user who ran it (via its ``response_url``)."""

    # response_url accepts five messages; a help or reset answer needs one.
    MAX_MESSAGES = 5

    def __init__(self, respond: Respond) -> None:
        self._respond = respond

    async def begin(self) -> None:
        return None

    async def update(self, text: str) -> None:
        return None  # ephemeral messages are not edited; only the final text is sent

    async def finish(self, text: str) -> None:
        chunks = split_message(text, MESSAGE_BYTES, measure=slack_size) or [""]
        for chunk in chunks[: self.MAX_MESSAGES]:
            await self._send(escape(chunk) or EMPTY_ANSWER)

    async def fail(self, reason: str) -> None:
        await self._send(failure_note(reason))

    async def _send(self, text: str) -> None:
        response = await call_slack("response_url", self._respond(text=text, response_type="ephemeral"))
        if response is not None and getattr(response, "status_code", 200) >= 400:
            log.warning("Slack response_url failed: HTTP %s", response.status_code)
