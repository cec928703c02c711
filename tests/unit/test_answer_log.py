"""Operators get one INFO line per answered message, without any of its words."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.events import ChannelRef, IncomingMessage, Outcome
from tests.support import RecordingReply, ScriptedGenerator, bot_stack


async def test_one_info_line_per_answer_without_its_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gen = ScriptedGenerator(lambda request: "the secret answer words")
    channel = ChannelRef("slack", "C9", "1.2")
    caplog.set_level(logging.INFO, logger="bot.core")
    async with bot_stack(tmp_path, gen) as stack:
        message = IncomingMessage("E1", channel, "U1", "alice", "a private question")
        outcome = await stack.bot.handle(message, RecordingReply())
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.core" and r.levelno == logging.INFO]
    assert outcome is Outcome.ANSWERED
    assert len(lines) == 1, lines
    assert lines[0].startswith("answered slack:C9/1.2: 0 history turns, 4 answer tokens, ")
    assert "secret" not in lines[0] and "private" not in lines[0]
