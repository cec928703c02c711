"""Bring a database to the newest schema with the Alembic migrations shipped in this package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.db import SQLITE_IMMEDIATE

MIGRATIONS = Path(__file__).with_name("migrations")
# Serialises concurrent start-ups on PostgreSQL (SQLite does it with BEGIN IMMEDIATE).
_PG_MIGRATION_LOCK = 0x63676C6D


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
    command.upgrade(alembic_config(connection), "head")


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Run every pending migration in one transaction (DDL is transactional on both backends)."""
    async with engine.execution_options(**{SQLITE_IMMEDIATE: True}).begin() as connection:
        await connection.run_sync(_upgrade)
