"""The log an operator reads: platform clients' retried reconnects are one line each."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from bot import logs


@pytest.fixture
def written() -> Iterator[io.StringIO]:
    """What the bot's logging writes (to stderr in the product)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure("INFO", ["s3cret-token-value"])
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _log_exception(logger: str, message: str, *args: object) -> None:
    try:
        raise OSError("Connect call failed ('127.0.0.1', 9)")
    except OSError:
        logging.getLogger(logger).exception(message, *args)


@pytest.mark.parametrize(
    ("logger", "message", "args"),
    [
        ("discord.client", "Attempting a reconnect in %.2fs", (1.5,)),
        ("discord.shard", "Failed to connect for shard_id: %s. Retrying...", (0,)),
        ("slack_sdk.socket_mode.aiohttp", "Failed to connect (error: refused); Retrying...", ()),
    ],
)
def test_a_retried_reconnect_is_one_warning_line(
    written: io.StringIO, logger: str, message: str, args: tuple[object, ...]
) -> None:
    _log_exception(logger, message, *args)
    lines = written.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    assert f" WARNING {logger}: " in lines[0]
    assert lines[0].endswith("(OSError: Connect call failed ('127.0.0.1', 9))")


def test_other_errors_keep_their_traceback_and_secrets_stay_masked(written: io.StringIO) -> None:
    _log_exception("bot.core", "answering failed with s3cret-token-value")
    text = written.getvalue()
    assert " ERROR bot.core: answering failed with [redacted]" in text
    assert "Traceback (most recent call last)" in text and "s3cret-token-value" not in text
