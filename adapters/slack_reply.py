"""Neutral reply calls -> Slack Web API calls: a placeholder, edits as text streams, continuation
messages for long answers, and a short note on failure.

Everything the model wrote is escaped (``& < >``) before it reaches Slack, so an answer can never
form ``<!channel>``, ``<!here>``, a user mention or a link. Web API errors are logged (method and
Slack's error code only, never a token) and swallowed: a reply that cannot be shown must not take
the bot down, and the core cannot do anything better with the exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.text import split_message

log = logging.getLogger(__name__)

# Slack accepts up to 40,000 characters but truncates display around 4,000; 3,500 bytes keeps
# every message whole, multi-byte text included.
MESSAGE_BYTES = 3500
PLACEHOLDER = ":hourglass_flowing_sand: _thinking…_"
EMPTY_ANSWER = "_(no answer)_"
INCOMPLETE = "Slack did not accept all of this answer; part of it may be missing."


def escape(text: str) -> str:
    """Slack's three control characters as entities; ``&`` first so nothing is escaped twice."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_size(text: str) -> int:
    """How Slack counts a chunk of model output: UTF-8 bytes after escaping."""
    return len(escape(text).encode("utf-8"))


def failure_note(reason: str) -> str:
    return f":warning: {escape(reason)}"


async def call_slack(method: str, call: Awaitable[Any]) -> Any | None:
    """Await one Web API call; on failure log it without secrets and return None.

    429s never get here: the client's ``AsyncRateLimitErrorRetryHandler`` retries them.
    """
    try:
        return await call
    except SlackApiError as error:
        log.warning("Slack %s failed: %s", method, error.response.get("error", error.response.status_code))
    except (aiohttp.ClientError, TimeoutError) as error:
        log.warning("Slack %s failed: %s", method, type(error).__name__)
    return None


class SlackReply:
    """One answer in a thread (or at a DM's top level when ``thread_ts`` is None)."""

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        thread_ts: str | None,
        *,
        min_edit_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,  # for the edit interval; tests pass a fake
    ) -> None:
        self._clock = clock
        self._client = client
        self._channel = channel
        self._thread_ts = thread_ts
        self._min_interval = min_edit_interval
        self._messages: list[tuple[str, str]] = []  # (ts, escaped text shown) of each message
        self._last_write = -float("inf")
        self._shown_text = False  # whether any model text has replaced the placeholder

    async def begin(self) -> None:
        await self._post(PLACEHOLDER)

    async def update(self, text: str) -> None:
        # The core throttles updates already; this guard holds Slack's ~1 edit/s per message
        # whatever the configured interval.
        if text.strip() and self._clock() - self._last_write >= self._min_interval:
            await self._show(text)

    async def finish(self, text: str) -> None:
        wait = self._min_interval - (self._clock() - self._last_write)
        if wait > 0:
            await asyncio.sleep(wait)
        if not await self._show(text):
            await self._post(failure_note(INCOMPLETE))

    async def fail(self, reason: str) -> None:
        note = failure_note(reason)
        if self._messages and not self._shown_text:
            await self._edit(0, note)  # the placeholder becomes the note
        else:
            await self._post(note)

    async def _show(self, text: str) -> bool:
        """Make the thread show ``text``; False if Slack refused part of it."""
        chunks = [escape(chunk) for chunk in split_message(text, MESSAGE_BYTES, measure=slack_size)]
        chunks = chunks or [EMPTY_ANSWER]
        self._shown_text = True
        complete = True
        for index, chunk in enumerate(chunks):
            if index >= len(self._messages):
                complete = await self._post(chunk) and complete
            elif self._messages[index][1] != chunk:
                complete = await self._edit(index, chunk) and complete
        return complete

    async def _post(self, text: str) -> bool:
        self._last_write = self._clock()
        response = await call_slack(
            "chat.postMessage",
            self._client.chat_postMessage(
                channel=self._channel,
                thread_ts=self._thread_ts,
                text=text,
                unfurl_links=False,
                unfurl_media=False,
            ),
        )
        if response is None or not isinstance(response.get("ts"), str):
            return False
        self._messages.append((response["ts"], text))
        return True

    async def _edit(self, index: int, text: str) -> bool:
        self._last_write = self._clock()
        ts = self._messages[index][0]
        response = await call_slack(
            "chat.update", self._client.chat_update(channel=self._channel, ts=ts, text=text)
        )
        if response is None:
            return False
        self._messages[index] = (ts, text)
        return True


Respond = Callable[..., Awaitable[Any]]


class SlackEphemeralReply:
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
