"""The console as a person uses it: in a real terminal (a pty), with line editing and Ctrl-D."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from bot.events import ChannelRef
from storage.repository import Storage
from tests.test_e2e_cli import chat_env


class Terminal:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=clean | env | {"TERM": "xterm"},
            close_fds=True,
        )
        os.close(slave)
        self.screen = ""
        self._seen = 0  # expect() looks only at output after the previous match

    def expect(self, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.screen[self._seen :]:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {needle!r}; screen: {self.screen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.screen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    time.sleep(0.05)
        self._seen = self.screen.index(needle, self._seen) + len(needle)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            os.close(self.master)


def _turns(url: str, session: str) -> list[str]:
    async def read() -> list[str]:
        storage = await Storage.open(url)
        try:
            return [turn.user for turn in await storage.recent_turns(ChannelRef("console", session), 10)]
        finally:
            await storage.close()

    return asyncio.run(read())


def test_console_line_editing_help_banner_and_ctrl_d(tmp_path: Path) -> None:
    env = chat_env(tmp_path)
    term = Terminal(["chat", "--session", "alice"], env)
    try:
        term.expect("session 'alice' (0 remembered turns)")
        term.expect("you> ")
        term.type("ello\x1b[D\x1b[D\x1b[D\x1b[Dh\r")  # four left arrows, then the missing "h"
        term.expect("bot> ")
        term.expect("you> ")
        term.type("help\r")
        term.expect("quit (or Ctrl-D)")
        term.expect("you> ")
        term.type("\x04")  # Ctrl-D at the prompt
        code = term.close()
    finally:
        term.process.kill()
    assert code == 0, term.screen[-2000:]
    assert _turns(env["BOT_DATABASE_URL"], "alice") == ["hello"]  # edited in place by readline
    assert "Traceback" not in term.screen

    again = Terminal(["chat", "--session", "alice"], env)
    try:
        again.expect("session 'alice' (1 remembered turn)")
        again.type("quit\r")
        assert again.close() == 0
    finally:
        again.process.kill()


async def test_a_recovered_answer_is_shown_with_its_question() -> None:
    import io

    from adapters.console_adapter import ConsoleAdapter
    from bot.events import IncomingMessage

    out = io.StringIO()
    console = ConsoleAdapter(session="s1", stdin=io.StringIO(""), stdout=out)
    message = IncomingMessage("e1", ChannelRef("console", "s1"), "me", "me", "what was that?")
    # A terminal has no message to edit: whatever handle was stored, the answer is printed anew.
    reply = console.reply_for(message, None)
    assert reply is not None
    await reply.begin()
    await reply.finish("this")
    assert out.getvalue() == "\n(an answer interrupted last time) you> what was that?\nbot> this\n"
    other = IncomingMessage("e2", ChannelRef("console", "other"), "me", "me", "x")
    assert console.reply_for(other, None) is None
