"""``chatglm-bot doctor`` against real parts: a checkpoint folder, SQLite, fake Slack / Discord, a port."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from bot import doctor
from tests.adapters.discord.fake_discord import FakeDiscord
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.model.fixture import tiny_dir
from tests.support import free_port, make_settings


def _lines(settings: object) -> tuple[int, dict[str, str]]:
    lines: list[str] = []
    code = doctor.run(settings, lines.append)  # type: ignore[arg-type]
    return code, {line.split()[1]: line for line in lines}


def test_a_good_setup_is_all_ok(tmp_path: Path) -> None:
    async def servers() -> tuple[FakeSlack, FakeDiscord]:
        slack = await FakeSlack().start()
        discord = FakeDiscord()
        await discord.start()
        return slack, discord

    loop = asyncio.new_event_loop()
    slack, discord = loop.run_until_complete(servers())
    try:
        settings = make_settings(
            tmp_path,
            model_path=str(tiny_dir("int4")),
            http_port=free_port(),
            slack_bot_token=BOT_TOKEN,
            slack_app_token=APP_TOKEN,
            slack_api_url=slack.api_url,
            discord_bot_token=discord.token,
            discord_api_url=discord.api_url,
        )
        code, lines = loop.run_until_complete(asyncio.to_thread(_lines, settings))
    finally:
        loop.run_until_complete(slack.close())
        loop.run_until_complete(discord.close())
        loop.close()
    assert code == 0, lines
    for name in ("python", "checkpoint", "database", "slack", "discord", "http"):
        assert lines[name].startswith("ok "), lines[name]
    assert "signed in as" in lines["slack"] and "signed in as" in lines["discord"]


def test_problems_are_named_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = make_settings(
            tmp_path,
            model_path=str(tmp_path),  # a folder without a checkpoint
            http_port=busy.getsockname()[1],
            slack_bot_token="xoxb-wrong",
            slack_api_url=f"http://127.0.0.1:{free_port()}/api/",  # nothing listens there
            database_url="postgresql://postgres@127.0.0.1:1/none",
        )
        code, lines = _lines(settings)
    assert code == 1
    assert lines["checkpoint"].startswith("problem") and "config.json" in lines["checkpoint"]
    assert lines["slack"].startswith("problem") and "unreachable" in lines["slack"]
    assert lines["http"].startswith("problem") and "BOT_HTTP_PORT" in lines["http"]
    assert lines["database"].startswith("problem")
    assert "xoxb-wrong" not in "".join(lines.values())
