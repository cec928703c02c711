"""Platforms that cannot be reached when ``serve`` starts: the real process keeps running (HTTP
health says what is down), logs one line per failed attempt and no traceback, and stops promptly
on SIGTERM even while it is still connecting."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.adapters.discord.fake_discord import FakeDiscord
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.faults.conftest import DEFAULT_ENV
from tests.faults.harness import BotProcess, base_env, wait_until
from tests.support import free_port

pytestmark = [pytest.mark.faults]

SIGTERM_EXIT_S = 10.0  # well below the minute Discord's gateway connect may take


async def test_unreachable_socket_mode_and_gateway_are_retried_in_one_line_each(tmp_path: Path) -> None:
    slack = await FakeSlack().start()
    slack.socket_url = f"ws://127.0.0.1:{free_port()}/socket"  # nothing listens there
    discord = FakeDiscord()
    await discord.start()
    port = free_port()
    env = {
        **base_env(tmp_path),
        **DEFAULT_ENV,
        "BOT_DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}",
        "BOT_HTTP_PORT": str(port),
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "SLACK_API_URL": slack.api_url,
        "DISCORD_BOT_TOKEN": discord.token,
        "DISCORD_API_URL": discord.api_url,
        "DISCORD_GATEWAY_URL": f"ws://127.0.0.1:{free_port()}/gateway",  # nothing listens there
    }
    bot = BotProcess(env, tmp_path, port)
    health: dict[str, object] | None = None
    try:
        bot.launch()

        async def both_tried() -> bool:
            nonlocal health
            health = await bot.health()
            log = bot.log_text()
            # While Slack's SDK still retries its websocket, Discord's first attempt has failed.
            return (
                health is not None and "Failed to connect (error:" in log and "discord is unreachable" in log
            )

        assert await wait_until(both_tried, 60, abort=bot.died), bot.log_tail()
        assert health is not None and health["status"] == "degraded", health  # served with a 503
        adapters = health["adapters"]
        assert isinstance(adapters, dict) and "connected" not in adapters.values(), health
        stopping = time.monotonic()
        bot.terminate()
        assert await bot.wait_exit(SIGTERM_EXIT_S) == 0
        assert time.monotonic() - stopping < SIGTERM_EXIT_S
    finally:
        bot.close()
        await slack.close()
        await discord.close()
    log = bot.log_text()
    assert "Traceback" not in log, log
    slack_lines = [line for line in log.splitlines() if "Failed to connect (error:" in line]
    assert slack_lines and all(" WARNING slack_bolt" in line for line in slack_lines), log
    gateway_lines = [line for line in log.splitlines() if "Attempting a reconnect" in line]
    assert gateway_lines and all(" WARNING discord.client: " in line for line in gateway_lines), log
    discord_lines = [line for line in log.splitlines() if "discord is unreachable" in line]
    assert discord_lines and all("Connect call failed" in line for line in discord_lines), log
    assert "stopped while the platforms were connecting" in log  # Slack's connect was cut short
    assert BOT_TOKEN not in log and APP_TOKEN not in log and discord.token not in log
