"""Fixtures for the Discord suite: the fake Discord server and a running adapter in front of the core."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route

from adapters.discord_adapter import DiscordAdapter
from tests.adapters.discord.fake_discord import FakeDiscord
from tests.support import BotStack, ScriptedGenerator, bot_stack, start_adapter

Running = tuple[DiscordAdapter, BotStack]
# The ``running`` fixture: ``running(generator, **settings)`` starts the adapter in front of the core.
StartRunning = Callable[..., AbstractAsyncContextManager[Running]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
    # Every send and edit of every test, not only the dedicated one, must allow no mentions.
    assert server.mention_leaks() == []


@pytest.fixture(autouse=True)
def _restore_discord_endpoints() -> Any:
    """The adapter points discord.py's process-wide endpoints at the fake; it must put them back."""
    before = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    yield
    after = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = before
    assert after == before, "the Discord endpoints were not restored"


def discord_settings(fake: FakeDiscord, **overrides: Any) -> dict[str, Any]:
    return {
        "discord_bot_token": "test-bot-token",
        "discord_api_url": fake.api_url,
        "discord_gateway_url": fake.gateway_url,
        **overrides,
    }


@pytest.fixture
def running(tmp_path: Path, fake: FakeDiscord) -> StartRunning:
    """``async with running(generator, **settings) as (adapter, stack)``: the core behind the adapter."""

    @asynccontextmanager
    async def start(generator: ScriptedGenerator | None = None, **overrides: Any) -> AsyncIterator[Running]:
        async with bot_stack(tmp_path, generator, **discord_settings(fake, **overrides)) as stack:
            adapter = DiscordAdapter(stack.settings, ready_timeout=10, guild_ready_timeout=0.05)
            await start_adapter(stack.bot, adapter)
            try:
                yield adapter, stack
            finally:
                await adapter.stop()

    return start
