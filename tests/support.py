"""Shared test doubles: a deterministic Generator and a whole bot stack over a temporary SQLite file."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.core import Bot
from bot.events import Adapter, BaseReply
from bot.generation import GenerationRequest, GenerationResult, Turn
from bot.service import ModelService
from storage.repository import Storage

_PIECES = re.compile(r"\s*\S+|\s+")


def default_reply(request: GenerationRequest) -> str:
    """Depends on the query and on how many turns of history the model saw."""
    return f"Answer {len(request.history) + 1} to: {request.query}"


class ScriptedGenerator:
    """A Generator whose answer is a function of the request, streamed piece by piece.

    Token counts are whitespace words (+4 per prompt part), which keeps budget tests readable.
    """

    def __init__(
        self,
        reply: Callable[[GenerationRequest], str] | None = None,
        *,
        token_delay: float = 0.0,
        max_context_tokens: int = 4096,
        fail_with: Exception | None = None,
    ) -> None:
        self.reply = reply or default_reply
        self.token_delay = token_delay
        self.fail_with = fail_with
        self._max_context_tokens = max_context_tokens
        self.requests: list[GenerationRequest] = []
        self.thread_names: set[str] = set()
        self.started = threading.Event()
        self._lock = threading.Lock()

    @property
    def max_context_tokens(self) -> int:
        return self._max_context_tokens

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def prompt_tokens(self, query: str, history: Sequence[Turn]) -> int:
        turns = sum(self.count_tokens(q) + self.count_tokens(r) + 4 for q, r in history)
        return turns + self.count_tokens(query) + 4

    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        emitted: list[str] = []
        for piece in self._accept(request):
            if should_stop():
                return GenerationResult("".join(emitted).strip(), 0, len(emitted), stopped=True)
            if self.token_delay:
                time.sleep(self.token_delay)
            on_text(piece)
            emitted.append(piece)
        return GenerationResult("".join(emitted).strip(), 0, len(emitted))

    def _accept(self, request: GenerationRequest) -> list[str]:
        """Record the request (or fail as scripted); the answer's pieces within the token limit."""
        with self._lock:
            self.requests.append(request)
            self.thread_names.add(threading.current_thread().name)
        self.started.set()
        if self.fail_with is not None:
            raise self.fail_with
        return _PIECES.findall(self.reply(request))[: request.params.max_new_tokens]


@dataclass
class BotStack:
    bot: Bot
    storage: Storage
    service: ModelService
    settings: Settings
    generator: ScriptedGenerator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'bot.db'}",
        "stream_interval": 0.05,
        "max_new_tokens": 256,
        "max_context_tokens": 2048,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


class SteppingClock:
    """A fake ``time.monotonic`` for the core: every reading returns the time, then moves it ``step`` on.

    The core reads its clock once when a stream starts and once per streamed piece, so with
    ``stream_interval = n * step`` it passes on every n-th piece, whatever the machine's speed. Use
    steps that are exact in binary (0.25, 0.5, ...) so the comparisons have no rounding.
    """

    def __init__(self, step: float, start: float = 0.0) -> None:
        self.step = step
        self.now = start
        self.readings = 0

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        self.readings += 1
        return now


@asynccontextmanager
async def bot_stack(
    tmp_path: Path,
    generator: ScriptedGenerator | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    **overrides: Any,
) -> AsyncIterator[BotStack]:
    """The real core, storage and model service around a scripted generator.

    Opening a second stack over the same ``tmp_path`` simulates a restart (same SQLite file,
    a new process instance id). ``clock`` is the core's (see ``SteppingClock``); ``overrides`` are
    settings.
    """
    settings = make_settings(tmp_path, **overrides)
    gen = generator or ScriptedGenerator()
    # One replica id for every stack of a test: a second stack is a restart of the first.
    storage = await Storage.open(settings.database_url, replica_id="test-replica", lease_s=settings.lease_s)
    service = ModelService(lambda: gen, queue_size=settings.queue_size, timeout_s=settings.request_timeout_s)
    await service.start()
    bot = Bot(settings, storage, service, clock=clock)
    try:
        yield BotStack(bot, storage, service, settings, gen)
    finally:
        await bot.drain(STACK_GRACE_S)
        await service.close()
        await storage.close()


class SteadyConnection:
    """For adapter doubles: a connection that never drops."""

    def connection(self) -> str:
        return "connected"

    async def lost(self) -> None:
        await asyncio.get_running_loop().create_future()


async def start_adapter(bot: Bot, adapter: Adapter) -> None:
    """Start ``adapter`` in front of ``bot`` and attach it, as the app's supervisor does."""
    await adapter.start(bot)
    bot.attach(adapter)


# How long a test stack's shutdown lets answers still running finish (as BOT_SHUTDOWN_GRACE_S).
STACK_GRACE_S = 2.0


class RecordingReply(BaseReply):
    """A ReplyHandle that records every call, for core and console tests. After ``begin`` its
    ``handle`` is ``{"reply": name}``; one built with a stored handle is shown "in" that reply."""

    def __init__(self, name: str = "reply", *, resumed: dict[str, Any] | None = None) -> None:
        self.name = name
        self.calls: list[tuple[str, str]] = []
        self.done = asyncio.Event()
        self._handle = resumed

    @property
    def handle(self) -> dict[str, Any] | None:
        return self._handle

    async def begin(self) -> None:
        self.calls.append(("begin", ""))
        if self._handle is None:
            self._handle = {"reply": self.name}

    async def update(self, text: str) -> None:
        self.calls.append(("update", text))

    async def finish(self, text: str) -> None:
        self.calls.append(("finish", text))
        self.done.set()

    async def fail(self, reason: str) -> None:
        self.calls.append(("fail", reason))
        self.done.set()

    @property
    def final(self) -> tuple[str, str] | None:
        ends = [call for call in self.calls if call[0] in ("finish", "fail")]
        assert len(ends) <= 1, f"more than one ending: {ends}"
        return ends[0] if ends else None

    @property
    def updates(self) -> list[str]:
        return [text for kind, text in self.calls if kind == "update"]


@dataclass
class _ScriptedState:
    request: GenerationRequest
    pieces: list[str]
    on_text: Callable[[str], None]
    should_stop: Callable[[], bool]
    emitted: list[str]
    stopped: bool = False

    @property
    def done(self) -> bool:
        return self.stopped or len(self.emitted) == len(self.pieces)


class ScriptedBatchGenerator(ScriptedGenerator):
    """The same answers, decoded as a BatchGenerator: one piece per state per step."""

    def __init__(self, *args: Any, max_batch_size: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_batch_size = max_batch_size
        self.step_sizes: list[int] = []

    def begin(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> _ScriptedState:
        return _ScriptedState(request, self._accept(request), on_text, should_stop, [])

    def step(self, states: Sequence[_ScriptedState]) -> None:
        self.step_sizes.append(len(states))
        if self.token_delay:
            time.sleep(self.token_delay)
        for state in states:
            if state.should_stop():
                state.stopped = True
                continue
            piece = state.pieces[len(state.emitted)]
            state.on_text(piece)
            state.emitted.append(piece)

    def finish(self, state: _ScriptedState) -> GenerationResult:
        text = "".join(state.emitted).strip()
        return GenerationResult(text, 0, len(state.emitted), stopped=state.stopped)
