"""Fixtures of the fault suite: a database (SQLite file, or a scratch PostgreSQL database), the fake
platforms in this process, and ``make_rig``, which starts a real bot process in front of them.

PostgreSQL works as in tests/storage (BOT_TEST_POSTGRES_URL; skipped when unreachable unless
BOT_TEST_REQUIRE_POSTGRES=1): a test asks for it with
``@pytest.mark.parametrize("backend", BACKENDS, indirect=True)``, or per transport with ``on(...)``;
without that it runs on SQLite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.adapters.discord.fake_discord import FakeDiscord
from tests.adapters.slack.fake_slack import FakeSlack
from tests.faults.harness import (
    TRANSPORTS,
    BotProcess,
    Database,
    DiscordAskTransport,
    DiscordMentionTransport,
    Rig,
    SlackHttpTransport,
    SlackSocketTransport,
    Transport,
    base_env,
)
from tests.storage.conftest import POSTGRES_URL, _scratch_database, postgres_admin_url
from tests.support import free_port

__all__ = ["postgres_admin_url"]  # the session fixture, shared with tests/storage

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# BOT_TEST_FAULTS_FULL=1 runs every scenario on every transport and both databases (slow).
FULL_MATRIX = os.environ.get("BOT_TEST_FAULTS_FULL") == "1"


def on(transport: str, backend: str = "sqlite") -> Any:
    """One case of ``parametrize(("transport", "backend"), [...], indirect=["backend"])``."""
    marks = [pytest.mark.postgres] if backend == "postgres" else []
    return pytest.param(transport, backend, id=f"{transport}-{backend}", marks=marks)


def cases(*chosen: Any) -> list[Any]:
    """``chosen`` (``on(...)`` cases), or with BOT_TEST_FAULTS_FULL=1 every transport on both databases."""
    if FULL_MATRIX:
        return [on(t, b) for b in ("sqlite", "postgres") for t in TRANSPORTS]
    return list(chosen)


def transports(*chosen: str) -> list[str]:
    """``chosen``, or with BOT_TEST_FAULTS_FULL=1 every transport."""
    return list(TRANSPORTS) if FULL_MATRIX else list(chosen)


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    name = str(getattr(request, "param", "sqlite"))
    if name == "postgres":
        request.getfixturevalue("postgres_admin_url")  # skips (or fails) when it is unreachable
    return name


@pytest.fixture
async def database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        (tmp_path / "db").mkdir()
        yield f"sqlite:///{tmp_path / 'db' / 'bot.db'}"
        return
    async with _scratch_database(POSTGRES_URL) as url:
        yield url


DEFAULT_ENV = {
    "BOT_STREAM_INTERVAL": "0.2",
    "BOT_RECOVER_WINDOW_S": "900",
    "BOT_SHUTDOWN_GRACE_S": "5",
    "BOT_LEASE_S": "3",
    "BOT_REPLICA_ID": "fault-bot-1",
    "FAULT_TOKEN_DELAY_S": "0.05",
    "FAULT_WORDS": "20",
}


@pytest.fixture
async def make_rig(tmp_path: Path, database_url: str) -> AsyncIterator[MakeRig]:
    """``await make_rig("slack_http", start=True, **env)``: fakes, transport and a started bot."""
    rigs: list[Rig] = []

    async def make(name: str, *, start: bool = True, ask_age_s: float = 0.0, **env: str) -> Rig:
        workdir = tmp_path / f"bot{len(rigs)}"
        workdir.mkdir()
        port = free_port()
        slack: FakeSlack | None = None
        discord: FakeDiscord | None = None
        transport: Transport
        if name.startswith("slack"):
            slack = await FakeSlack().start()
            transport = (
                SlackHttpTransport(slack, lambda: f"http://127.0.0.1:{port}")
                if name == "slack_http"
                else SlackSocketTransport(slack)
            )
        else:
            discord = FakeDiscord()
            await discord.start()
            transport = (
                DiscordMentionTransport(discord)
                if name == "discord_mention"
                else DiscordAskTransport(discord, age_s=ask_age_s)
            )
        settings: dict[str, Any] = {
            **base_env(workdir),
            **DEFAULT_ENV,
            "BOT_DATABASE_URL": database_url,
            "BOT_HTTP_PORT": str(port),
            **transport.env(),
            **env,
        }
        bot = BotProcess(settings, workdir, port)
        rig = Rig(transport, bot, Database(database_url, workdir / "data"), slack, discord)
        rigs.append(rig)
        if start:
            await bot.start()
        return rig

    yield make
    for rig in rigs:
        rig.bot.close()
        await rig.db.close()
        if rig.slack is not None:
            await rig.slack.close()
        if rig.discord is not None:
            await rig.discord.close()
