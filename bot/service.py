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
from typing import Protocol

from bot import metrics
from bot.generation import (
    BatchGenerator,
    DecodeState,
    GenerationRequest,
    GenerationResult,
    Generator,
    GeneratorFactory,
    IdleWork,
    Turn,
)

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


class TextStream(Protocol):
    """Text deltas of one answer (``async for``); ``result`` is set once they are exhausted, and
    ``cancel()`` stops the generation (iterating then raises ``GenerationCancelled``)."""

    result: GenerationResult | None

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[str]: ...


class ChatService(Protocol):
    """What the bot's core needs from a model: ``ModelService`` (in-process) or ``OpenAIService`` (any
    OpenAI-compatible server). ``stream`` raises ``ServiceBusy`` at once when its queue is full; the
    others report through the stream as ``ServiceError``s."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def max_context_tokens(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def prompt_tokens(self, query: str, history: Sequence[Turn]) -> int: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    def stream(self, request: GenerationRequest) -> TextStream: ...


# A stream's events, (kind, payload): TEXT a delta (str), DONE the GenerationResult, ERROR a ServiceError.
TEXT, DONE, ERROR = "text", "done", "error"
Event = tuple[str, object]
_ReadyCallback = Callable[[BaseException | None], None]


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    deadline: float
    submitted: float = field(default_factory=time.monotonic)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_text: bool = False

    def on_text(self, text: str) -> None:
        self.emit(TEXT, text)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.timed_out()

    def timed_out(self) -> bool:
        return time.monotonic() > self.deadline

    def emit(self, kind: str, payload: object) -> None:
        """Called on the inference thread; hands the event to the caller's loop."""
        if kind == TEXT and not self.first_text:
            self.first_text = True
            metrics.FIRST_TEXT.observe(time.monotonic() - self.submitted)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.cancelled.set()


class EventStream:
    """A ``TextStream`` read from a queue of events (see ``Event``). Leaving the iteration early
    (break, cancellation) calls ``cancel``, which each kind of stream implements."""

    def __init__(self, events: asyncio.Queue[Event]) -> None:
        self.result: GenerationResult | None = None
        self._events = events

    def cancel(self) -> None:
        raise NotImplementedError

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                kind, payload = await self._events.get()
                if kind == TEXT:
                    assert isinstance(payload, str)
                    yield payload
                elif kind == DONE:
                    assert isinstance(payload, GenerationResult)
                    self.result = payload
                    return
                else:
                    assert isinstance(payload, ServiceError)
                    raise payload
        finally:
            if self.result is None:
                self.cancel()


class Stream(EventStream):
    """Text deltas of one request to the inference thread; cancelling stops it at its next token."""

    def __init__(self, job: _Job) -> None:
        super().__init__(job.events)
        self._job = job

    def cancel(self) -> None:
        self._job.cancelled.set()


class ModelService:
    def __init__(self, factory: GeneratorFactory, *, queue_size: int = 64, timeout_s: float = 300.0) -> None:
        self._factory = factory
        self._timeout_s = timeout_s
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._generator: Generator | None = None
        self._closing = False
        self._active: list[_Job] = []

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
                job.emit(ERROR, ServiceClosed())
        for job in list(self._active):
            job.cancelled.set()
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
        return len(self._active)

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
        if isinstance(generator, BatchGenerator) and generator.max_batch_size > 1:
            self._run_batched(generator)
        else:
            self._run_serial(generator)

    def _next_job(self, block: bool) -> _Job | _Idle | None:
        try:
            job = self._jobs.get(block=block)
        except queue.Empty:
            return _IDLE
        metrics.QUEUE_DEPTH.set(self._jobs.qsize())
        if job is not None:
            metrics.QUEUE_WAIT.observe(time.monotonic() - job.submitted)
        return job

    def _run_serial(self, generator: Generator) -> None:
        has_idle_work = isinstance(generator, IdleWork)
        idle_work = False
        while True:
            job = self._next_job(block=not idle_work)
            if job is None:
                return
            if not isinstance(job, _Job):
                idle_work = self._idle_step(generator)
                continue
            if self._admit(job):
                self._set_active([job])
                try:
                    result = generator.generate(job.request, job.on_text, job.should_stop)
                except Exception:
                    self._fail(job)
                else:
                    self._complete(job, result)
                finally:
                    self._set_active([])
                idle_work = has_idle_work

    def _idle_step(self, generator: Generator) -> bool:
        """One unit of the generator's deferred work (it has some: see ``IdleWork``); True while more
        remains."""
        assert isinstance(generator, IdleWork)
        try:
            return generator.idle_step()
        except Exception:
            log.exception("idle work failed")
            return False

    def _run_batched(self, generator: BatchGenerator) -> None:
        """Requests decode together, one forward per step; new ones join at step boundaries. With
        nothing to decode or queued, the generator's idle work runs a unit at a time."""
        active: list[tuple[_Job, DecodeState]] = []
        has_idle_work = isinstance(generator, IdleWork)
        idle_work = False
        polled: _Job | _Idle | None = _IDLE  # a job taken off the queue while checking for idleness
        while True:
            if not active and idle_work:
                polled = self._next_job(block=False)
                if isinstance(polled, _Idle):
                    idle_work = self._idle_step(generator)
                    continue
            while len(active) < generator.max_batch_size:
                if isinstance(polled, _Idle):
                    job = self._next_job(block=not active)
                else:
                    job, polled = polled, _IDLE
                if job is None:
                    for job, state in active:
                        job.cancelled.set()
                        self._finish_state(generator, job, state)
                    return
                if not isinstance(job, _Job):
                    break
                if not self._admit(job):
                    continue
                try:
                    active.append((job, generator.begin(job.request, job.on_text, job.should_stop)))
                except Exception:
                    self._fail(job)
            self._set_active([job for job, _ in active])
            running = [state for _, state in active if not state.done]
            if running:
                try:
                    generator.step(running)
                except Exception:
                    log.exception("batched decode step failed")
                    for job, state in active:
                        job.cancelled.set()
                        self._finish_state(generator, job, state, failed=True)
                    active = []
                    continue
            still: list[tuple[_Job, DecodeState]] = []
            for job, state in active:
                if state.done:
                    self._finish_state(generator, job, state)
                    idle_work = has_idle_work
                else:
                    still.append((job, state))
            active = still
            if not active:
                self._set_active([])

    def _admit(self, job: _Job) -> bool:
        """False (the caller told why) for a job cancelled or out of time while it waited."""
        if job.cancelled.is_set():
            self._end(job, GenerationCancelled())
            return False
        if job.timed_out():
            self._end(job, GenerationTimeout(self._timeout_s))
            return False
        return True

    def _finish_state(
        self, generator: BatchGenerator, job: _Job, state: DecodeState, *, failed: bool = False
    ) -> None:
        try:
            result = generator.finish(state)
        except Exception:
            self._fail(job)
            return
        if failed:
            self._end(job, GenerationFailed())
        else:
            self._complete(job, result)

    def _complete(self, job: _Job, result: GenerationResult) -> None:
        metrics.TOKENS.inc(result.new_tokens)
        metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
        metrics.PREFIX_REUSED_TOKENS.inc(result.reused_tokens)
        if job.cancelled.is_set():
            self._end(job, GenerationCancelled())
        elif job.timed_out():
            self._end(job, GenerationTimeout(self._timeout_s))
        else:
            self._end(job, result)

    def _fail(self, job: _Job) -> None:
        log.exception("generation failed")
        self._end(job, GenerationFailed())

    def _end(self, job: _Job, outcome: GenerationResult | ServiceError) -> None:
        if isinstance(outcome, ServiceError):
            job.emit(ERROR, outcome)
            metrics.GENERATIONS.labels(type(outcome).__name__).inc()
        else:
            job.emit(DONE, outcome)
            metrics.GENERATIONS.labels("ok").inc()
        metrics.LATENCY.observe(time.monotonic() - job.submitted)

    def _set_active(self, jobs: list[_Job]) -> None:
        self._active = jobs
        metrics.IN_FLIGHT.set(len(jobs))


class _Idle:
    """The queue had nothing for a batch that is already decoding."""


_IDLE = _Idle()
