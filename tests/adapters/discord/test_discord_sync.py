"""``chatglm-bot discord-sync``: explicit command registration against the fake REST API."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from adapters.discord_adapter import configure_sync_parser, run_sync
from adapters.discord_commands import INVITE_PERMISSIONS
from bot.config import ConfigError, Settings
from tests.adapters.discord.conftest import discord_settings
from tests.adapters.discord.fake_discord import APP_ID, GUILD_ID, FakeDiscord

DOCS = Path(__file__).resolve().parents[3] / "README.md"


def sync_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chatglm-bot discord-sync")
    configure_sync_parser(parser)
    return parser.parse_args(argv)


async def sync(fake: FakeDiscord, *argv: str) -> int:
    settings = Settings(_env_file=None, **discord_settings(fake))
    # run_sync is the CLI entry point and runs its own event loop, so give it a thread.
    return await asyncio.to_thread(run_sync, sync_args(*argv), settings)


async def test_guild_sync_registers_the_commands_in_that_server_only(
    fake: FakeDiscord, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await sync(fake, "--guild", str(GUILD_ID)) == 0

    assert list(fake.registered) == [str(GUILD_ID)]
    commands = {command["name"]: command for command in fake.registered[str(GUILD_ID)]}
    assert sorted(commands) == ["ask", "help", "reset"]
    [prompt] = commands["ask"]["options"]
    assert (prompt["name"], prompt["type"], prompt["required"]) == ("prompt", 3, True)
    assert "options" not in commands["reset"] or commands["reset"]["options"] == []
    out = capsys.readouterr().out
    assert f"in server {GUILD_ID}" in out
    assert f"client_id={APP_ID}" in out and f"permissions={INVITE_PERMISSIONS.value}" in out


async def test_global_sync(fake: FakeDiscord) -> None:
    assert await sync(fake) == 0
    assert list(fake.registered) == ["global"]
    assert sorted(command["name"] for command in fake.registered["global"]) == ["ask", "help", "reset"]


async def test_sync_to_a_server_without_the_bot_fails_with_discords_reason(
    fake: FakeDiscord, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await sync(fake, "--guild", "1234") == 1
    assert "Missing Access" in capsys.readouterr().err
    assert fake.registered == {}


async def test_sync_with_a_rejected_token_is_a_config_error(fake: FakeDiscord) -> None:
    fake.token = "another-token"
    with pytest.raises(ConfigError, match="rejected DISCORD_BOT_TOKEN"):
        await sync(fake)
    assert fake.registered == {}


def test_the_docs_invite_link_has_the_permissions_the_bot_needs() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    assert f"permissions={INVITE_PERMISSIONS.value}" in docs
    assert "scope=bot+applications.commands" in docs
    assert "chatglm-bot discord-sync --guild" in docs
