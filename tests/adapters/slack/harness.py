"""The real bot stack + the real SlackAdapter (slack-bolt) wired to the fake Slack."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters.slack_adapter import SlackAdapter
from adapters.slack_events import EVENTS_PATH
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, FakeSlack, sign
from tests.support import BotStack, ScriptedGenerator, bot_stack, start_adapter

EDIT_INTERVAL = 0.05  # the adapter's per-message edit floor, shortened so tests stream quickly


@dataclass
class SlackRig:
    stack: BotStack
    adapter: SlackAdapter
    fake: FakeSlack
    http: TestClient[web.Request, web.Application] | None = None

    async def post(
        self, body: dict[str, Any], *, retry: int = 0, headers: dict[str, str] | None = None
    ) -> tuple[int, float]:
        """POST a signed event to /slack/events; returns (status, seconds until the response)."""
        assert self.http is not None
        raw = json.dumps(body)
        sent_headers = sign(raw) if headers is None else headers
        if retry:
            sent_headers = {
                **sent_headers,
                "X-Slack-Retry-Num": str(retry),
                "X-Slack-Retry-Reason": "timeout",
            }
        started = time.monotonic()
        response = await self.http.post(EVENTS_PATH, data=raw, headers=sent_headers)
        await response.read()
        return response.status, time.monotonic() - started


@asynccontextmanager
async def slack_rig(
    tmp_path: Path,
    fake: FakeSlack,
    generator: ScriptedGenerator | None = None,
    *,
    socket_mode: bool = False,
    edit_interval: float = EDIT_INTERVAL,
    **overrides: Any,
) -> AsyncIterator[SlackRig]:
    slack: dict[str, Any] = {
        "slack_bot_token": BOT_TOKEN,
        "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": fake.api_url,
    }
    if socket_mode:
        slack["slack_app_token"] = APP_TOKEN
    async with bot_stack(tmp_path, generator, **{**slack, **overrides}) as stack:
        http_app = None if socket_mode else web.Application()
        adapter = SlackAdapter(stack.settings, http_app, min_edit_interval=edit_interval)
        rig = SlackRig(stack, adapter, fake)
        await start_adapter(stack.bot, adapter)
        if http_app is None:
            try:
                yield rig
            finally:
                await adapter.stop()
        else:
            async with TestClient(TestServer(http_app, host="127.0.0.1")) as client:
                rig.http = client
                try:
                    yield rig
                finally:
                    # Before the server closes: it waits for work started by its handlers.
                    await adapter.stop()
