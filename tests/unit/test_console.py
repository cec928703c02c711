import asyncio
import io
from pathlib import Path

from adapters.console_adapter import ConsoleAdapter, ConsoleReply
from bot.core import HELP_TEXT, RESET_TEXT
from tests.support import ScriptedGenerator, bot_stack, start_adapter


async def chat(tmp_path: Path, lines: str, generator: ScriptedGenerator | None = None) -> str:
    out = io.StringIO()
    async with bot_stack(tmp_path, generator) as stack:
        adapter = ConsoleAdapter(stdin=io.StringIO(lines), stdout=out, user="tester")
        await start_adapter(stack.bot, adapter)
        await asyncio.wait_for(adapter.closed(), 10)
    return out.getvalue()


async def test_console_chat_streams_commands_and_quits(tmp_path: Path) -> None:
    output = await chat(tmp_path, "hello there\nhelp\nreset\nagain\nquit\nnever read\n")
    assert "bot> Answer 1 to: hello there\n" in output
    # A command's answer is finished without a placeholder first, yet shown after the prompt too.
    assert f"you> bot> {HELP_TEXT}\n" in output and f"you> bot> {RESET_TEXT}\n" in output
    assert "bot> Answer 1 to: again\n" in output  # history was reset
    assert "never read" not in output


async def test_console_conversation_continues_after_restart(tmp_path: Path) -> None:
    await chat(tmp_path, "first\n")
    output = await chat(tmp_path, "second\n")  # EOF ends the chat like quit
    assert "Answer 2 to: second" in output


async def test_console_skips_blank_lines_and_survives_odd_input(tmp_path: Path) -> None:
    output = await chat(tmp_path, "\n   \n\x00\x1b[31m\ud800?\n")
    assert "Answer 1 to: [31m\ufffd?" in output


async def test_cancel_stops_only_the_current_answer(tmp_path: Path) -> None:
    gen = ScriptedGenerator(lambda r: "w " * 400 if r.query == "slow" else "fast", token_delay=0.01)
    out = io.StringIO()
    async with bot_stack(tmp_path, gen) as stack:
        feed = _LineFeed()
        adapter = ConsoleAdapter(stdin=feed, stdout=out, user="tester")  # type: ignore[arg-type]
        await start_adapter(stack.bot, adapter)
        feed.put("slow\n")
        await asyncio.to_thread(gen.started.wait, 5)
        adapter._interrupt()  # what Ctrl-C does while an answer is being generated
        feed.put("next\n")
        feed.put("")
        await asyncio.wait_for(adapter.closed(), 10)
    text = out.getvalue()
    assert "[The answer was cancelled.]" in text
    assert "bot> fast\n" in text


def test_reply_prints_only_new_text() -> None:
    out = io.StringIO()
    reply = ConsoleReply(out)

    async def run() -> None:
        await reply.begin()
        await reply.update("Hello")
        await reply.update("Hello, wor")
        await reply.finish("Hello, world")

    asyncio.run(run())
    assert out.getvalue() == "bot> Hello, world\n"


def test_a_reply_finished_or_failed_without_begin_still_shows_its_prompt() -> None:
    finished, failed, interrupted = io.StringIO(), io.StringIO(), io.StringIO()

    async def run() -> None:
        await ConsoleReply(finished, "what was that?").finish("this")
        await ConsoleReply(failed).fail("The answer was cancelled.")
        placeholder = ConsoleReply(interrupted)
        await placeholder.begin()
        await placeholder.fail("The answer was cancelled.")

    asyncio.run(run())
    assert finished.getvalue() == "\n(an answer interrupted last time) you> what was that?\nbot> this\n"
    assert failed.getvalue() == "bot> [The answer was cancelled.]\n"
    assert interrupted.getvalue() == "bot> \rbot> [The answer was cancelled.]\n"


class _LineFeed:
    """A stdin whose lines arrive over time (readline blocks like a terminal)."""

    def __init__(self) -> None:
        import queue

        self._lines: queue.Queue[str] = queue.Queue()

    def put(self, line: str) -> None:
        self._lines.put(line)

    def readline(self) -> str:
        return self._lines.get()
