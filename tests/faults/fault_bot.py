"""The real ``chatglm-bot serve`` with the model replaced by the scripted test generator.

    python -m tests.faults.fault_bot serve

Everything else is the product: settings from the environment, the HTTP server, the adapters,
storage and signal handling. Only ``bot.app.model_factory`` is patched. The generator answers
``reply(query, turn)`` (see below), one whitespace-separated word per token, sleeping
``FAULT_TOKEN_DELAY_S`` (default 0.05) before each, so an answer takes as long as a test needs.

``FAULT_WORDS`` (default 20) filler words pad every answer; a query may ask for another number
with ``#words=N``. Every answer ends with ``END_MARK``, so a fake platform can recognise the edit
that shows a complete answer.

Start-up speed: the CLI's parser imports ``bot.model.cli`` (for ``generate``), which imports torch:
seconds per start, and the fault tests start the bot dozens of times. Unless ``FAULT_FULL_CLI=1``
that one module is replaced by a stub whose ``generate`` refuses; ``serve`` never uses it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
from collections.abc import Sequence

from bot.generation import GenerationRequest

END_MARK = "(end)"
_WORDS = re.compile(r"#words=(\d+)")


def reply(query: str, turn: int, default_words: int) -> str:
    """``Answer <turn> to: <query> w1 w2 ... wN (end)``: a function of the query and the history's
    length only, so a test can compute the answer it expects."""
    found = _WORDS.search(query)
    words = int(found.group(1)) if found else default_words
    filler = "".join(f" w{index}" for index in range(1, words + 1))
    return f"Answer {turn} to: {query}{filler} {END_MARK}"


def _install() -> None:
    from bot import app
    from tests.support import ScriptedGenerator

    delay = float(os.environ.get("FAULT_TOKEN_DELAY_S", "0.05"))
    words = int(os.environ.get("FAULT_WORDS", "20"))

    def answer(request: GenerationRequest) -> str:
        return reply(request.query, len(request.history) + 1, words)

    generator = ScriptedGenerator(answer, token_delay=delay)
    app.model_factory = lambda settings: lambda: generator


def _stub_model_cli() -> None:
    import bot.model

    stub = types.ModuleType("bot.model.cli")

    def configure_parser(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rest", nargs="*")

    def run(args: argparse.Namespace) -> int:
        print("fault_bot: generate is not available here (FAULT_FULL_CLI=1 enables it)", file=sys.stderr)
        return 2

    stub.configure_parser = configure_parser  # type: ignore[attr-defined]
    stub.run = run  # type: ignore[attr-defined]
    sys.modules["bot.model.cli"] = stub
    bot.model.cli = stub


def main(argv: Sequence[str] | None = None) -> int:
    if os.environ.get("FAULT_FULL_CLI") != "1":
        _stub_model_cli()
    _install()
    from bot.cli import main as cli_main

    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
