"""The model service: one inference thread owns the model, fed by a bounded queue.

Callers on the asyncio loop get text back through ``loop.call_soon_threadsafe``; the loop never
runs torch code. A full queue is reported at once (``ServiceBusy``), never left hanging.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from bot import metrics
from bot.generation import GenerationRequest, GenerationResult, Generator, GeneratorFactory, Turn

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A generation did not complete; the message is safe to show to a user."""


class ServiceBusy(ServiceError):
    def __init__(self) -> None:
        super().__init__("I'm busy with other questions right now; please try again in a moment.")


class ServiceClosed(ServiceError):
    def __init__(self) -> None:
        super().__init__("The bot is shutting down; please ask again in a minute.")


class GenerationTimeout(ServiceError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"The answer took longer than the {seconds:g} s limit and was stopped.")


class GenerationCancelled(ServiceError):
    def __init__(self) -> None:
        super().__init__("The answer was cancelled.")


class GenerationFailed(ServiceError):
    def __init__(self) -> None:
        super().__init__("The model failed to produce an answer.")


_TEXT, _DONE, _ERROR = "text", "done", "error"
_Event = tuple[str, object]
_ReadyCallback = Callable[[BaseException | None], None]


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    deadline: float
    submitted: float = field(default_factory=time.monotonic)
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_text: bool = False

    def emit(self, kind: str, payload: object) -> None:
        """Called on the inference thread; hands the event to the caller's loop."""
        if kind == _TEXT and not self.first_text:
            self.first_text = True
            metrics.FIRST_TEXT.observe(time.monotonic() - self.submitted)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.cancelled.set()


class Stream:
    """Async iterator of text deltas for one request; ``result`` is set once it is exhausted.

    Leaving the iteration early (break, cancellation) cancels the generation at its next token.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job
        self.result: GenerationResult | None = None

    def cancel(self) -> None:
        self._job.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                kind, payload = await self._job.events.get()
                if kind == _TEXT:
                    assert isinstance(payload, str)
                    yield payload
                elif kind == _DONE:
                    assert isinstance(payload, GenerationResult)
                    self.result = payload
                    return
                else:
                    assert isinstance(payload, ServiceError)
                    raise payload
        finally:
            if self.result is None:
                self._job.cancelled.set()


class ModelService:
    def __init__(self, factory: GeneratorFactory, *, queue_size: int = 64, timeout_s: float = 300.0) -> None:
        self._factory = factory
        self._timeout_s = timeout_s
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._generator: Generator | None = None
        self._closing = False
        self._current: _Job | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the inference thread and load the model there; raises what loading raised."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def report(error: BaseException | None) -> None:
            if not ready.done():
                if error is None:
                    ready.set_result(None)
                else:
                    ready.set_exception(error)

        self._thread = threading.Thread(target=self._run, args=(loop, report), name="inference", daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        """Stop accepting, cancel queued and in-flight work, join the thread."""
        if self._closing:
            return
        self._closing = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(_ERROR, ServiceClosed())
        if self._current is not None:
            self._current.cancelled.set()
        metrics.QUEUE_DEPTH.set(0)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)

    # -- callers ---------------------------------------------------------------------------
    @property
    def generator(self) -> Generator:
        if self._generator is None:
            raise RuntimeError("ModelService.start() has not completed")
        return self._generator

    @property
    def max_context_tokens(self) -> int:
        return self.generator.max_context_tokens

    def count_tokens(self, text: str) -> int:
        return self.generator.count_tokens(text)

    def prompt_tokens(self, query: str, history: Sequence[Turn]) -> int:
        return self.generator.prompt_tokens(query, history)

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    @property
    def in_flight(self) -> int:
        return 0 if self._current is None else 1

    def stream(self, request: GenerationRequest) -> Stream:
        """Queue ``request``; raises ``ServiceBusy`` at once when the queue is full."""
        if self._closing or self._thread is None:
            raise ServiceClosed()
        job = _Job(request, asyncio.get_running_loop(), time.monotonic() + self._timeout_s)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            metrics.GENERATIONS.labels("busy").inc()
            raise ServiceBusy() from None
        metrics.QUEUE_DEPTH.set(self._jobs.qsize())
        return Stream(job)

    # -- inference thread ------------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop, report: _ReadyCallback) -> None:
        try:
            self._generator = self._factory()
        except BaseException as exc:  # handed to start()'s caller, not swallowed
            loop.call_soon_threadsafe(report, exc)
            return
        loop.call_soon_threadsafe(report, None)
        generator = self._generator
        while True:
            job = self._jobs.get()
            metrics.QUEUE_DEPTH.set(self._jobs.qsize())
            if job is None:
                return
            self._serve(generator, job)

    def _serve(self, generator: Generator, job: _Job) -> None:
        metrics.QUEUE_WAIT.observe(time.monotonic() - job.submitted)
        if job.cancelled.is_set():
            job.emit(_ERROR, GenerationCancelled())
            return
        self._current = job
        metrics.IN_FLIGHT.set(1)

        def timed_out() -> bool:
            return time.monotonic() > job.deadline

        def should_stop() -> bool:
            return job.cancelled.is_set() or timed_out()

        outcome = "ok"
        try:
            if timed_out():  # waited out its whole time limit in the queue
                raise GenerationTimeout(self._timeout_s)
            result = generator.generate(job.request, lambda text: job.emit(_TEXT, text), should_stop)
            metrics.TOKENS.inc(result.new_tokens)
            if job.cancelled.is_set():
                raise GenerationCancelled()
            if timed_out():
                raise GenerationTimeout(self._timeout_s)
            job.emit(_DONE, result)
        except ServiceError as exc:
            outcome = type(exc).__name__
            job.emit(_ERROR, exc)
        except Exception:
            outcome = "error"
            log.exception("generation failed")
            job.emit(_ERROR, GenerationFailed())
        finally:
            self._current = None
            metrics.IN_FLIGHT.set(0)
            metrics.GENERATIONS.labels(outcome).inc()
            metrics.LATENCY.observe(time.monotonic() - job.submitted)
