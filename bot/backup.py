"""``chatglm-bot backup FILE``: a consistent copy of the history while the bot keeps running.

SQLite: the online backup API (a WAL database is copied page by page under its own locks, so a
plain ``cp`` of the file, which can catch a half-written page, is never needed). PostgreSQL has its
own tool for this; the command says which one instead of re-implementing it.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from bot.config import ConfigError, Settings
from storage.db import normalize_url


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="where to write the copy (must not exist yet)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = normalize_url(settings.database_url, settings.data_dir)
    if url.get_backend_name() != "sqlite":
        shown = url.set(drivername="postgresql").render_as_string(hide_password=True)
        print(
            f"The history is in PostgreSQL ({shown}); back it up with its own tool, e.g.\n"
            f"  pg_dump --format=custom --file={args.file} '{shown}'",
            file=sys.stderr,
        )
        return 2
    source = Path(str(url.database))
    target: Path = args.file.expanduser()
    if not source.is_file():
        raise ConfigError(f"BOT_DATABASE_URL: there is no database at {source} yet (nothing to back up)")
    if target.exists():
        raise ConfigError(f"{target} already exists; give a new file name")
    if not target.parent.is_dir():
        raise ConfigError(f"folder {target.parent} does not exist")
    with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    print(f"Backed up {source} to {target}.")
    return 0
