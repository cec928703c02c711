"""Every storage test runs on SQLite (a tmp_path file) and on PostgreSQL (a scratch database each).

PostgreSQL comes from BOT_TEST_POSTGRES_URL; when it cannot be reached the PostgreSQL variants are
skipped, unless BOT_TEST_REQUIRE_POSTGRES=1 (CI), which makes them fail instead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import make_url

from storage.db import mask_url
from storage.repository import Storage

POSTGRES_URL = os.environ.get("BOT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("BOT_TEST_REQUIRE_POSTGRES") == "1"


def _libpq(url: str) -> str:
    """The URL as asyncpg itself takes it (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _ping() -> None:
    connection = await asyncpg.connect(_libpq(POSTGRES_URL), timeout=5)
    await connection.close()


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    try:
        asyncio.run(_ping())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"PostgreSQL at {mask_url(POSTGRES_URL)} is unreachable ({type(exc).__name__}: {exc})"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason}; BOT_TEST_REQUIRE_POSTGRES=1 requires it")
        pytest.skip(f"{reason}; set BOT_TEST_POSTGRES_URL to run the PostgreSQL variants")
    return POSTGRES_URL


@asynccontextmanager
async def _scratch_database(admin_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test, dropped afterwards (tests never see each other's rows)."""
    name = f"bot_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_libpq(admin_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    # Sync on purpose: the reachability check runs its own event loop.
    if request.param == "postgres":
        request.getfixturevalue("postgres_admin_url")
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A plain (un-normalised) URL of an empty database, as a user would configure it."""
    if backend == "sqlite":
        (tmp_path / "data").mkdir()
        yield f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
        return
    async with _scratch_database(POSTGRES_URL) as url:
        yield url


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    opened = await Storage.open(database_url, instance_id="replica-a#1")  # replica "replica-a", incarnation 1
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def open_storage(database_url: str) -> AsyncIterator[Callable[[str], Awaitable[Storage]]]:
    """Opens more Storage instances on the same database, e.g. a restarted process; closed at teardown."""
    opened: list[Storage] = []

    async def _open(instance_id: str) -> Storage:
        opened.append(await Storage.open(database_url, instance_id=instance_id))
        return opened[-1]

    yield _open
    for instance in opened:
        await instance.close()
