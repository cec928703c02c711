"""``chatglm-bot serve``'s composition: settings -> adapters -> core -> model service, both platforms."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot import app
from tests.adapters.discord.fake_discord import BOT_ID, FakeDiscord
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack, event_body, mention
from tests.support import ScriptedGenerator, make_settings
from tests.unit.test_app import free_port


async def test_serve_runs_slack_and_discord_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = ScriptedGenerator()
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: generator)
    slack = await FakeSlack().start()
    discord = FakeDiscord()
    await discord.start()
    settings = make_settings(
        tmp_path,
        http_port=free_port(),
        slack_bot_token=BOT_TOKEN,
        slack_app_token=APP_TOKEN,
        slack_api_url=slack.api_url,
        discord_bot_token=discord.token,
        discord_api_url=discord.api_url,
        discord_gateway_url=discord.gateway_url,
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
