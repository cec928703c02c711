"""``chatglm-bot serve``'s composition: settings -> adapters -> core -> model service, both platforms."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot import app
from bot.config import ConfigError, Settings
from tests.adapters.discord.fake_discord import BOT_ID, FakeDiscord
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack, event_body, mention
from tests.support import ScriptedGenerator, free_port, make_settings


def _with_discord(tmp_path: Path, discord: FakeDiscord, **overrides: Any) -> Settings:
    """Settings whose Discord is ``discord`` (the fake's token, REST API and gateway)."""
    return make_settings(
        tmp_path,
        discord_bot_token=discord.token,
        discord_api_url=discord.api_url,
        discord_gateway_url=discord.gateway_url,
        **overrides,
    )


async def test_serve_runs_slack_and_discord_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = ScriptedGenerator()
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: generator)
    slack = await FakeSlack().start()
    discord = FakeDiscord()
    await discord.start()
    settings = _with_discord(
        tmp_path,
        discord,
        http_port=free_port(),
        slack_bot_token=BOT_TOKEN,
        slack_app_token=APP_TOKEN,
        slack_api_url=slack.api_url,
    )
    serving = asyncio.create_task(app.run(settings))
    try:
        await slack.wait_for(lambda: slack.socket is not None, 30)
        event = mention("hello from slack")
        await slack.send_envelope(event_body(event))
        await slack.wait_for(
            lambda: slack.thread_text("C1", event["ts"]) == ["Answer 1 to: hello from slack"]
        )

        channel = discord.add_channel()
        question = await discord.user_message(channel, f"<@{BOT_ID}> hello from discord", mentions=(BOT_ID,))
        await discord.wait_for(
            lambda: [r.content for r in discord.replies_to(question)] == ["Answer 1 to: hello from discord"]
        )
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        await slack.close()
        await discord.close()


async def _health(port: int) -> dict[str, object]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        body: dict[str, object] = await resp.json()
        return body


async def test_an_unreachable_slack_leaves_discord_and_health_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    generator = ScriptedGenerator()
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: generator)
    discord = FakeDiscord()
    await discord.start()
    port = free_port()
    settings = _with_discord(
        tmp_path,
        discord,
        http_port=port,
        slack_bot_token=BOT_TOKEN,
        slack_app_token=APP_TOKEN,
        slack_api_url=f"http://127.0.0.1:{free_port()}/api/",  # nothing listens there
    )
    serving = asyncio.create_task(app.run(settings))
    try:
        channel = discord.add_channel()
        for _ in range(300):  # the HTTP server starts first, then the adapters
            with contextlib.suppress(aiohttp.ClientConnectionError):
                adapters = (await _health(port))["adapters"]
                # The adapters start together: Discord need not wait for Slack's attempt to fail.
                if isinstance(adapters, dict) and adapters == {"slack": "down", "discord": "connected"}:
                    break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("Discord never connected, or Slack was never tried")
        question = await discord.user_message(channel, f"<@{BOT_ID}> still here?", mentions=(BOT_ID,))
        await discord.wait_for(
            lambda: [r.content for r in discord.replies_to(question)] == ["Answer 1 to: still here?"]
        )
        health = await _health(port)
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        await discord.close()
    assert health["adapters"] in (
        {"slack": "down", "discord": "connected"},
        {"slack": "connecting", "discord": "connected"},  # its retry is under way
    )
    assert {"status", "queue_depth", "in_flight"} <= set(health)
    assert health["status"] == "degraded"  # served with a 503: one platform is not answering
    log = caplog.text
    assert "slack is unreachable" in log and "rejected" not in log


async def test_a_rejected_slack_token_still_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def load() -> ScriptedGenerator:
        loads.append("model")
        return ScriptedGenerator()

    monkeypatch.setattr(app, "model_factory", lambda settings: load)
    slack = await FakeSlack().start()
    try:
        settings = make_settings(
            tmp_path,
            http_port=free_port(),
            slack_bot_token="xoxb-wrong",
            slack_app_token=APP_TOKEN,
            slack_api_url=slack.api_url,
        )
        with pytest.raises(ConfigError, match="Slack rejected SLACK_BOT_TOKEN") as error:
            await asyncio.wait_for(app.run(settings), 30)
    finally:
        await slack.close()
    assert loads == []  # checked before the model load, which takes minutes for a real checkpoint
    assert "xoxb-wrong" not in str(error.value)


async def _discord_state(port: int) -> object:
    with contextlib.suppress(aiohttp.ClientConnectionError):
        adapters = (await _health(port))["adapters"]
        return adapters.get("discord") if isinstance(adapters, dict) else None
    return None


async def _until_discord(port: int, state: str, within: float = 30.0) -> None:
    for _ in range(int(within / 0.1)):
        if await _discord_state(port) == state:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"discord never became {state!r} (last: {await _discord_state(port)!r})")


async def test_a_dropped_discord_gateway_is_reported_until_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = ScriptedGenerator()
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: generator)
    discord = FakeDiscord()
    await discord.start()
    port = free_port()
    settings = _with_discord(tmp_path, discord, http_port=port)
    serving = asyncio.create_task(app.run(settings))
    try:
        await _until_discord(port, "connected")
        discord.gateway_down = True
        await discord.close_gateway(4000)  # "unknown error": discord.py reconnects by itself
        await _until_discord(port, "reconnecting")
        assert (await _health(port))["status"] == "degraded"
        discord.gateway_down = False
        await _until_discord(port, "connected")
        channel = discord.add_channel()
        question = await discord.user_message(channel, f"<@{BOT_ID}> back?", mentions=(BOT_ID,))
        await discord.wait_for(
            lambda: [r.content for r in discord.replies_to(question)] == ["Answer 1 to: back?"]
        )
        assert serving.done() is False
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        await discord.close()


async def test_a_token_discord_revokes_while_running_stops_the_bot_with_one_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "model_factory", lambda settings: ScriptedGenerator)
    discord = FakeDiscord()
    await discord.start()
    port = free_port()
    settings = _with_discord(tmp_path, discord, http_port=port)
    serving = asyncio.create_task(app.run(settings))
    try:
        await _until_discord(port, "connected")
        await discord.close_gateway(4004)  # "authentication failed": the token was reset
        with pytest.raises(ConfigError, match=r"Discord rejected DISCORD_BOT_TOKEN.*4004") as error:
            await asyncio.wait_for(serving, 30)
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConfigError):
            await serving
        await discord.close()
    assert discord.token not in str(error.value)
