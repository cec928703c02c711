"""Alembic environment. ``storage.migrate`` passes a live connection in ``config.attributes``;
the alembic CLI (see storage/alembic.ini) connects to BOT_DATABASE_URL instead."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from storage.db import create_engine, normalize_url
from storage.models import Base, UTCDateTime


def render_item(kind: str, obj: Any, _autogen: AutogenContext) -> str | Literal[False]:
    # Migrations must not import the models (they change later), so spell the UTC type in plain sa.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite can barely ALTER TABLE
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_environment() -> None:
    url = os.environ.get("BOT_DATABASE_URL", "sqlite:///chatglm-bot.db")
    engine = create_engine(normalize_url(url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    asyncio.run(run_from_environment())
