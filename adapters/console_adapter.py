"""Chat from a terminal through the same core and storage as every platform.

Lines are read on a daemon thread (a blocking read must not keep the process alive at exit);
answers stream to stdout. Ctrl-C while an
answer is being generated cancels that answer; Ctrl-C (or EOF, or ``quit``) at the prompt ends
the chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import signal
import sys
import threading
import uuid
from typing import Any, TextIO

from bot.events import BaseReply, ChannelRef, Core, IncomingMessage, Outcome

QUIT_WORDS = frozenset({"quit", "exit", "/quit", "/exit"})
PROMPT = "you> "
QUIT_HELP = "• quit (or Ctrl-D): leave the chat; Ctrl-C stops the answer being written\n"


class ConsoleReply(BaseReply):
    """Prints the answer as it grows: only the text not printed yet. ``question`` is shown first for
    an answer recovered after a crash, so the reader knows what it answers."""

    def __init__(self, out: TextIO, question: str | None = None) -> None:
        self._out = out
        self._printed = ""
        self._question = question
        self._opened = False

    async def begin(self) -> None:
        self._open()
        self._out.flush()

    async def update(self, text: str) -> None:
        self._open()
        self._write_new(text)

    async def finish(self, text: str) -> None:
        # A command's answer (help, reset, a refusal) is finished without a begin() first.
        self._open()
        self._write_new(text)
        self._out.write("\n")
        self._out.flush()

    async def fail(self, reason: str) -> None:
        if not self._opened:
            self._open()
        elif not self._printed:
            self._out.write("\rbot> ")  # over the placeholder prompt
        self._out.write(f"\n[{reason}]\n" if self._printed else f"[{reason}]\n")
        self._out.flush()

    def _open(self) -> None:
        """The answer's ``bot> `` prompt (after its question, for a recovered answer), once."""
        if self._opened:
            return
        self._opened = True
        if self._question is not None:
            self._out.write(f"\n(an answer interrupted last time) you> {self._question}\n")
        self._out.write("bot> ")

    def _write_new(self, text: str) -> None:
        if text.startswith(self._printed):
            self._out.write(text[len(self._printed) :])
        else:  # the final text was post-processed (e.g. stripped): print it whole
            self._out.write("\n" + text)
        self._printed = text
        self._out.flush()


class ConsoleAdapter:
    platform = "console"

    def __init__(
        self,
        *,
        session: str = "local",
        user: str | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        self._stdin = stdin or sys.stdin
        # A terminal gets line editing and history (readline through input()); a pipe is read as is.
        self._interactive = self._stdin is sys.stdin and sys.stdin.isatty()
        self._out = stdout or sys.stdout
        self._user = user or _current_user()
        self._channel = ChannelRef(self.platform, session)
        self._current: asyncio.Task[Outcome] | None = None
        self._quit = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if self._stdin is sys.stdin and isinstance(sys.stdin, io.TextIOWrapper):
            sys.stdin.reconfigure(errors="replace")  # a non-UTF-8 byte must not end the chat

    async def start(self, core: Core) -> None:
        self._task = asyncio.create_task(self._chat(core))

    def connection(self) -> str:
        return "connected"

    async def lost(self) -> None:
        await asyncio.get_running_loop().create_future()  # a terminal has no connection to lose

    async def closed(self) -> None:
        """Returns when the user has ended the chat."""
        if self._task is not None:
            await self._task

    async def _chat(self, core: Core) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        remembered = await core.remembered_turns(self._channel)
        turns = f"{remembered} remembered turn{'s' if remembered != 1 else ''}"
        self._out.write(
            f"Chatting with ChatGLM2 in session '{self._channel.channel_id}' ({turns}). "
            "Type 'help', 'reset' or 'quit'.\n"
        )
        try:
            while True:
                if not self._interactive:
                    self._out.write(PROMPT)
                    self._out.flush()
                line = await self._read_line()
                if line is not None and not line:  # end of input (Ctrl-D): leave the shell a clean line
                    self._out.write("\n")
                    self._out.flush()
                if line is None or not line or line.strip().lower() in QUIT_WORDS:
                    break
                if not line.strip():
                    continue
                self._current = asyncio.create_task(core.handle(self._message(line), ConsoleReply(self._out)))
                with contextlib.suppress(asyncio.CancelledError):
                    await self._current
                self._current = None
                if line.strip().lower().lstrip("/!") == "help":
                    self._out.write(QUIT_HELP)
                    self._out.flush()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)

    async def stop(self) -> None:
        self._quit.set()
        if self._current is not None:
            self._current.cancel()

    async def _read_line(self) -> str | None:
        """The next line, or None when the user quit with Ctrl-C at the prompt."""
        loop = asyncio.get_running_loop()
        line: asyncio.Future[str] = loop.create_future()

        def read() -> None:
            try:
                text = self._input() if self._interactive else self._stdin.readline()
            except (OSError, ValueError, EOFError):
                text = ""
            loop.call_soon_threadsafe(deliver, text)

        def deliver(text: str) -> None:
            if not line.done():
                line.set_result(text)

        threading.Thread(target=read, name="console-input", daemon=True).start()
        quit_wait = asyncio.ensure_future(self._quit.wait())
        waiters: set[asyncio.Future[Any]] = {line, quit_wait}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            quit_wait.cancel()
        return line.result() if line.done() else None

    def _input(self) -> str:
        import readline  # noqa: F401  (imported for its side effect: input() gets line editing)

        return input(PROMPT) + "\n"

    async def resolve(self, message: IncomingMessage) -> IncomingMessage:
        return message

    def reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> ConsoleReply | None:
        # A terminal has no message to edit: a recovered answer is printed anew, after its question.
        return ConsoleReply(self._out, message.text) if message.channel == self._channel else None

    def _message(self, line: str) -> IncomingMessage:
        return IncomingMessage(
            event_id=uuid.uuid4().hex,
            channel=self._channel,
            author_id=self._user,
            author_name=self._user,
            text=line,
            is_direct=True,
        )

    def _interrupt(self) -> None:
        if self._current is not None and not self._current.done():
            self._current.cancel()  # cancels this answer, not the chat
        else:
            self._out.write("\n")
            self._quit.set()


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "console"
