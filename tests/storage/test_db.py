"""Database URL handling and the SQLite engine set-up (no database server needed)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import event, text

from bot.config import ConfigError
from storage import db
from storage.db import SQLITE_IMMEDIATE, create_engine, mask_url, normalize_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://bot:pw@db.example:5432/chat", "postgresql+asyncpg://bot:pw@db.example:5432/chat"),
        ("postgres://bot:pw@db.example/chat", "postgresql+asyncpg://bot:pw@db.example/chat"),
        ("postgresql+psycopg2://bot@db.example/chat", "postgresql+asyncpg://bot@db.example/chat"),
        ("postgresql+asyncpg://bot@db.example/chat", "postgresql+asyncpg://bot@db.example/chat"),
        ("postgresql+psycopg://bot@db.example/chat", "postgresql+psycopg://bot@db.example/chat"),
        ("  postgresql://bot@db.example/chat  ", "postgresql+asyncpg://bot@db.example/chat"),
        (
            "postgresql://bot@db.example/chat?sslmode=require",
            "postgresql+asyncpg://bot@db.example/chat?ssl=require",
        ),
    ],
)
def test_postgres_urls_get_an_async_driver(raw: str, expected: str) -> None:
    assert normalize_url(raw).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize("prefix", ["sqlite:///", "sqlite+aiosqlite:///", "sqlite+pysqlite:///"])
def test_sqlite_urls_get_aiosqlite_and_a_parent_directory(tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "deep" / "er" / "bot.db"
    url = normalize_url(f"{prefix}{path}", data_dir=tmp_path)
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(path)
    assert path.parent.is_dir()


def test_a_relative_sqlite_path_lives_in_the_data_dir_whatever_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    url = normalize_url("sqlite:///history/bot.db", data_dir=tmp_path / "data")
    assert url.database == str(tmp_path / "data" / "history" / "bot.db")
    assert (tmp_path / "data" / "history").is_dir()
    assert list(elsewhere.iterdir()) == []


def test_no_folder_is_created_outside_the_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        normalize_url(f"sqlite:///{tmp_path / 'other' / 'bot.db'}", data_dir=tmp_path / "data")
    assert not (tmp_path / "other").exists()


def test_an_uncreatable_sqlite_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create"):
        normalize_url(f"sqlite:///{tmp_path / 'file' / 'sub' / 'bot.db'}", data_dir=tmp_path)


@pytest.mark.parametrize("raw", ["sqlite://", "sqlite:///:memory:", "sqlite+aiosqlite://"])
def test_in_memory_sqlite_is_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="in-memory"):
        normalize_url(raw)


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("mysql://bot:hunter2@db.example/chat", "unsupported database 'mysql'"),
        ("postgresql+mysqldb://bot:hunter2@db.example/chat", "not an async driver"),
        ("postgresql://bot:hunter2@db.example:notaport/chat", "not a valid URL"),
        ("definitely not a url, hunter2", "not a valid URL"),
        ("", "not a valid URL"),
    ],
)
def test_bad_urls_raise_one_line_without_the_password(raw: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        normalize_url(raw)
    message = str(caught.value)
    assert complaint in message
    assert "\n" not in message
    if "://bot:" in raw:
        assert "hunter2" not in message
        assert "bot:***@db.example" in message


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("postgresql://bot:pw@host/db", "postgresql://bot:***@host/db"),
        ("postgresql://bot:p@ss/w0rd@host/db", "postgresql://bot:***@host/db"),
        ("postgresql://bot@host/db", "postgresql://bot@host/db"),
        ("sqlite:///bot.db", "sqlite:///bot.db"),
    ],
)
def test_mask_url(raw: str, masked: str) -> None:
    assert mask_url(raw) == masked


async def test_sqlite_engine_pragmas_and_immediate_write_transactions(tmp_path: Path) -> None:
    engine = create_engine(normalize_url(f"sqlite:///{tmp_path / 'bot.db'}"))
    begins: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("BEGIN"):
            begins.append(statement)

    try:
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
            assert (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 30_000
        async with engine.begin() as connection:
            await connection.execute(text("SELECT 1"))
        async with engine.execution_options(**{SQLITE_IMMEDIATE: True}).begin() as connection:
            await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert begins[-2:] == ["BEGIN", "BEGIN IMMEDIATE"]


class _LockedCursor:
    """A cursor whose first ``locked`` statements fail as SQLite does while another connection
    is switching a new database to WAL."""

    def __init__(self, locked: int, message: str = "database is locked") -> None:
        self.locked = locked
        self.message = message
        self.statements: list[str] = []

    def execute(self, sql: str) -> None:
        self.statements.append(sql)
        if len(self.statements) <= self.locked:
            raise sqlite3.OperationalError(self.message)


def test_switching_to_wal_waits_out_a_lock() -> None:
    cursor = _LockedCursor(locked=3)
    db._set_wal(cursor)
    assert cursor.statements == ["PRAGMA journal_mode = WAL"] * 4


def test_switching_to_wal_gives_up_at_the_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 50)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db._set_wal(_LockedCursor(locked=10**9))


def test_switching_to_wal_does_not_retry_other_errors() -> None:
    cursor = _LockedCursor(locked=1, message="disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        db._set_wal(cursor)
    assert len(cursor.statements) == 1
