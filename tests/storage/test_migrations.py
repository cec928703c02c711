"""The shipped Alembic migrations build exactly the schema the ORM models describe."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

import storage
from bot.config import ConfigError
from bot.events import ChannelRef
from storage.db import create_engine, normalize_url
from storage.migrate import MIGRATIONS, alembic_config
from storage.models import Base
from storage.repository import Storage

TABLES = {"alembic_version", "conversations", "messages", "processed_events"}


async def _inspect(url: str, probe: Any) -> Any:
    engine = create_engine(normalize_url(url))
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(probe)
    finally:
        await engine.dispose()


def _tables_and_revision(connection: Connection) -> tuple[set[str], str | None]:
    revision = MigrationContext.configure(connection).get_current_revision()
    return set(inspect(connection).get_table_names()), revision


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrations_ship_inside_the_package_with_one_head() -> None:
    assert MIGRATIONS.parent == Path(storage.__file__).parent
    assert (MIGRATIONS / "env.py").is_file()
    scripts = ScriptDirectory.from_config(alembic_config())
    assert len(scripts.get_heads()) == 1


async def test_open_migrates_an_empty_database_to_head(database_url: str) -> None:
    assert await _inspect(database_url, _tables_and_revision) == (set(), None)
    opened = await Storage.open(database_url)
    await opened.close()
    tables, revision = await _inspect(database_url, _tables_and_revision)
    assert tables == TABLES
    assert revision == _head()


async def test_migrated_schema_matches_the_models(storage: Storage, database_url: str) -> None:
    assert await _inspect(database_url, _schema_diff) == []


async def test_reopening_keeps_data_and_downgrade_round_trips(storage: Storage, database_url: str) -> None:
    channel = ChannelRef("console", "local")
    await storage.append_turn(
        channel,
        author_id="u",
        author_name="U",
        user_text="q",
        user_tokens=1,
        assistant_text="a",
        assistant_tokens=1,
    )
    again = await Storage.open(database_url)
    assert [turn.user for turn in await again.recent_turns(channel, 5)] == ["q"]
    await again.close()

    def _down_and_up(connection: Connection) -> set[str]:
        command.downgrade(alembic_config(connection), "base")
        emptied = set(inspect(connection).get_table_names())
        command.upgrade(alembic_config(connection), "head")
        return emptied

    assert await _inspect(database_url, _down_and_up) == {"alembic_version"}
    assert await _inspect(database_url, _schema_diff) == []


async def test_concurrent_first_starts_all_succeed(database_url: str) -> None:
    opened = await asyncio.gather(*(Storage.open(database_url) for _ in range(3)))
    for handle in opened:
        await handle.close()
    assert (await _inspect(database_url, _tables_and_revision))[0] == TABLES


@pytest.mark.parametrize(
    "url",
    ["postgresql://bot:hunter2@127.0.0.1:1/chat", "sqlite:///{tmp_path}"],
    ids=["refused-port", "sqlite-path-is-a-directory"],
)
async def test_an_unusable_database_is_a_config_error(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        await Storage.open(url.format(tmp_path=tmp_path))
    message = str(caught.value)
    assert message.startswith("cannot open database ")
    assert "\n" not in message
    assert "hunter2" not in message


async def test_a_relative_sqlite_path_works_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the migrations are found next to the package, not via the cwd
    opened = await Storage.open("sqlite:///state/bot.db", data_dir=tmp_path)
    await opened.close()
    assert (tmp_path / "state" / "bot.db").is_file()
    assert (await _inspect(f"sqlite:///{tmp_path / 'state' / 'bot.db'}", _tables_and_revision))[0] == TABLES
