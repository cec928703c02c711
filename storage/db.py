"""Database URLs and engines: SQLite (embedded default) or PostgreSQL, always through async drivers."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.config import ConfigError

# An execution option read by the "begin" hook: a write transaction on SQLite takes the write lock up
# front (BEGIN IMMEDIATE), so concurrent writers queue on busy_timeout. A deferred transaction that
# reads first and then writes fails at once with "database is locked"; busy_timeout cannot save it.
SQLITE_IMMEDIATE = "sqlite_begin_immediate"
SQLITE_BUSY_TIMEOUT_MS = 30_000

_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
_KNOWN_ASYNC = {"sqlite": {"aiosqlite"}, "postgresql": {"asyncpg", "psycopg", "psycopg_async"}}
_SYNC_DRIVERS = {"pysqlite", "psycopg2", "pg8000"}
# Greedy up to the last "@": an unencoded "@" or "/" in a password must not leak its tail.
_PASSWORD = re.compile(r"(://[^:/@]*:).*@")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; works on strings that do not parse too."""
    return _PASSWORD.sub(r"\1***@", url)


def normalize_url(raw: str, data_dir: Path | None = None) -> URL:
    """The async-driver URL for ``raw``; a plain ``sqlite:///`` / ``postgres(ql)://`` URL gets
    aiosqlite / asyncpg, an explicit async driver is kept. Raises ``ConfigError`` naming the
    (masked) URL when it cannot be used.

    A relative SQLite path is taken from ``data_dir`` (not the current folder, so a service and a
    shell see the same file); only folders inside ``data_dir`` are created, never others."""
    shown = mask_url(raw.strip())
    try:
        url = make_url(raw.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(f"database URL {shown!r} is not a valid URL (e.g. sqlite:///bot.db)") from None
    backend, _, driver = url.drivername.partition("+")
    backend = "postgresql" if backend == "postgres" else backend
    if backend not in _ASYNC_DRIVERS:
        raise ConfigError(
            f"database URL {shown!r}: unsupported database {backend!r} (use sqlite or postgresql)"
        )
    if not driver or driver in _SYNC_DRIVERS:
        driver = _ASYNC_DRIVERS[backend]
    elif driver not in _KNOWN_ASYNC[backend]:
        raise ConfigError(f"database URL {shown!r}: {driver!r} is not an async driver for {backend}")
    url = url.set(drivername=f"{backend}+{driver}")
    if backend == "sqlite":
        return _sqlite_file(url, shown, data_dir)
    if driver == "asyncpg" and "sslmode" in url.query:
        # libpq spells it sslmode; asyncpg takes the same values as ssl=.
        url = url.difference_update_query(["sslmode"]).update_query_dict({"ssl": url.query["sslmode"]})
    return url


def _sqlite_file(url: URL, shown: str, data_dir: Path | None) -> URL:
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise ConfigError(
            f"database URL {shown!r}: an in-memory SQLite database would lose the history; "
            "give a file, e.g. sqlite:///chatglm-bot.db"
        )
    if url.query.get("uri"):
        return url  # a file: URI is the user's own business
    path = Path(database).expanduser()
    if not path.is_absolute():
        path = (data_dir or Path.cwd()) / path
    base = data_dir.expanduser().resolve() if data_dir is not None else None
    if base is not None and path.resolve().is_relative_to(base):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"database URL {shown!r}: cannot create {path.parent}: {exc.strerror}"
            ) from None
    elif not path.parent.is_dir():
        raise ConfigError(
            f"database URL {shown!r}: folder {path.parent} does not exist (create it, or give a path "
            "inside BOT_DATA_DIR)"
        )
    return url.set(database=str(path))


def _set_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another connection holds the lock.

    Switching the journal mode can answer "database is locked" at once, without waiting on
    busy_timeout (seen when two processes open a new database together), so the wait is done here,
    within the same bound. Hand-written: it runs inside the driver's connect hook, on the driver's
    own thread, where a blocking sleep is what is wanted."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def create_engine(url: URL) -> AsyncEngine:
    """An async engine for a normalised URL; SQLite gets WAL, a busy timeout, foreign keys and
    SQLAlchemy-controlled BEGIN (see ``SQLITE_IMMEDIATE``)."""
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    engine = create_async_engine(url)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the sqlite3 driver from issuing its own (deferred) BEGIN; _on_begin does it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            _set_wal(cursor)
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
