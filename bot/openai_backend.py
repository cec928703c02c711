"""``OpenAIService``: the bot's answers from any OpenAI-compatible server (``chatglm-bot api``, vLLM,
llama.cpp's server, Ollama) instead of the in-process engine; it loads no weights.

It has ``ModelService``'s surface (``bot.service.ChatService``): at most ``BOT_OPENAI_CONCURRENCY``
streams are open at once and at most ``BOT_QUEUE_SIZE`` wait for one (beyond that ``ServiceBusy`` at
once); ``BOT_REQUEST_TIMEOUT_S`` bounds each answer, the wait included. Before the first text, a
connection error, a 5xx or a 429 is retried with exponential backoff (a 429's or 503's Retry-After
is honoured); once text has streamed, a failure ends the answer with ``GenerationFailed``.

Token counts use the ChatGLM2 tokenizer when ``BOT_MODEL_PATH`` holds a ``tokenizer.model``;
otherwise they are estimated as UTF-8 bytes / 3 (rounded up), which errs high for both English
(~4 bytes a token) and Chinese (~4.5 bytes a token), so a history trimmed to fit is never too long.
A finished answer's counts are the server's ``usage`` where it sends one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bot import metrics
from bot.config import ConfigError, Settings
from bot.generation import GenerationRequest, GenerationResult, Turn
from bot.model.tokenizer import TOKENIZER_FILE, ChatGLMTokenizer
from bot.service import (
    DONE,
    ERROR,
    TEXT,
    EventStream,
    GenerationCancelled,
    GenerationFailed,
    GenerationTimeout,
    ServiceBusy,
    ServiceClosed,
    ServiceError,
)

log = logging.getLogger(__name__)

ATTEMPTS = 4  # before the first text: the first try and three retries
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
CONNECT_TIMEOUT_S = 10.0
Emit = Callable[[str, object], None]


class BackendUnavailable(GenerationFailed):
    def __init__(self) -> None:
        ServiceError.__init__(
            self, "The model server is not answering right now; please try again in a few minutes."
        )


class _Retryable(Exception):
    """A failure before the first text that another attempt may not have."""

    def __init__(self, reason: str, *, retry_after: float | None = None, busy: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.busy = busy


class _Malformed(Exception):
    pass


class OpenAIStream(EventStream):
    """A ``TextStream`` fed by a task that talks to the server; leaving the iteration early or
    ``cancel()`` cancels the task, which closes the HTTP stream."""

    def __init__(self, run: Callable[[Emit], Coroutine[Any, Any, None]]) -> None:
        super().__init__(asyncio.Queue())
        self._ended = False
        self.task = asyncio.create_task(run(self._emit))
        self.task.add_done_callback(self._on_done)

    def cancel(self) -> None:
        self.task.cancel()

    def _emit(self, kind: str, payload: object) -> None:
        if not self._ended:
            self._ended = kind != TEXT
            self._events.put_nowait((kind, payload))

    def _on_done(self, task: asyncio.Task[None]) -> None:
        # A task cancelled before it ever ran emitted nothing: the reader must not wait forever.
        if task.cancelled():
            self._emit(ERROR, GenerationCancelled())


class OpenAIService:
    def __init__(self, settings: Settings) -> None:
        self._url = settings.openai_base_url.strip().rstrip("/") + "/chat/completions"
        self._model = settings.openai_model.strip()
        key = settings.openai_api_key
        self._headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
        self._model_path = settings.model_path.strip()
        self._max_context_tokens = settings.max_context_tokens
        self._timeout_s = settings.request_timeout_s
        self._queue_size = settings.queue_size
        self._concurrency = settings.openai_concurrency
        self._slots = asyncio.Semaphore(self._concurrency)
        self._waiting = 0
        self._active = 0
        self._streams: set[OpenAIStream] = set()
        self._session: aiohttp.ClientSession | None = None
        self._tokenizer: ChatGLMTokenizer | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self._tokenizer = await asyncio.to_thread(_tokenizer, self._model_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"BOT_MODEL_PATH: {exc}") from None
        counting = "the ChatGLM2 tokenizer" if self._tokenizer else "an estimate (no tokenizer.model)"
        log.info("model backend: %s (model %s); token counts from %s", self._url, self._model, counting)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        self._closing = True
        tasks = [stream.task for stream in self._streams]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- callers ---------------------------------------------------------------------------
    @property
    def max_context_tokens(self) -> int:
        return self._max_context_tokens  # the server's own limit is not discoverable: BOT_MAX_CONTEXT_TOKENS

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False))
        return math.ceil(len(text.encode("utf-8")) / 3)

    def prompt_tokens(self, query: str, history: Sequence[Turn]) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.build_chat_input(query, history))
        return self.count_tokens(ChatGLMTokenizer.build_prompt(query, history)) + 2  # [gMASK] sop

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def in_flight(self) -> int:
        return self._active

    def stream(self, request: GenerationRequest) -> OpenAIStream:
        if self._closing or self._session is None:
            raise ServiceClosed()
        # Streams whose task has not run yet count as waiting, so compare the total with both bounds.
        if self._waiting + self._active >= self._queue_size + self._concurrency:
            metrics.GENERATIONS.labels("busy").inc()
            raise ServiceBusy()
        self._waiting += 1
        stream = OpenAIStream(lambda emit: self._run(request, emit))
        self._streams.add(stream)
        stream.task.add_done_callback(lambda _: self._streams.discard(stream))
        return stream

    # -- one answer ------------------------------------------------------------------------
    async def _run(self, request: GenerationRequest, emit: Emit) -> None:
        """The stream's task: emits text, then a result or an error."""
        started = time.monotonic()
        outcome = "ok"
        waiting = True
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._slots:
                    self._waiting -= 1
                    waiting = False
                    self._active += 1
                    try:
                        result = await self._generate(request, emit)
                    finally:
                        self._active -= 1
            metrics.TOKENS.inc(result.new_tokens)
            emit(DONE, result)
        except TimeoutError:
            outcome = "GenerationTimeout"
            emit(ERROR, GenerationTimeout(self._timeout_s))
        except ServiceError as exc:
            outcome = type(exc).__name__
            emit(ERROR, exc)
        except asyncio.CancelledError:
            outcome = "GenerationCancelled"
            emit(ERROR, GenerationCancelled())
            raise
        except Exception:  # a bug or an unforeseen answer: this request fails, the service goes on
            log.exception("the model backend request failed")
            outcome = "GenerationFailed"
            emit(ERROR, GenerationFailed())
        finally:
            if waiting:
                self._waiting -= 1
            metrics.GENERATIONS.labels(outcome).inc()
            metrics.LATENCY.observe(time.monotonic() - started)

    async def _generate(self, request: GenerationRequest, emit: Emit) -> GenerationResult:
        body = self._body(request)
        attempt = 1
        while True:
            try:
                return await self._attempt(body, request, emit)
            except _Retryable as exc:
                if attempt >= ATTEMPTS:
                    log.error("model backend %s failed %d times, giving up: %s", self._url, attempt, exc)
                    raise ServiceBusy() if exc.busy else BackendUnavailable() from None
                delay = exc.retry_after
                if delay is None:
                    delay = min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
                log.warning("model backend %s: %s; retrying in %.1f s", self._url, exc, delay)
                await asyncio.sleep(delay)
                attempt += 1

    def _body(self, request: GenerationRequest) -> dict[str, object]:
        messages: list[dict[str, str]] = []
        for query, answer in request.history:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": request.query})
        params = request.params
        body: dict[str, object] = {
            "model": self._model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,  # top_k is no OpenAI parameter: BOT_TOP_K is the local engine's
        }
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def _attempt(
        self, body: dict[str, object], request: GenerationRequest, emit: Emit
    ) -> GenerationResult:
        assert self._session is not None
        reader = _ChunkReader(emit)
        try:
            async with self._session.post(self._url, json=body, headers=self._headers) as response:
                if response.status == 429 or response.status >= 500:
                    raise _Retryable(
                        f"HTTP {response.status}",
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                        busy=response.status == 429,
                    )
                if response.status != 200:
                    detail = (await response.text())[:300]
                    log.error(
                        "model backend %s refused the request: HTTP %d %s", self._url, response.status, detail
                    )
                    raise GenerationFailed()
                async for raw in response.content:
                    if reader.feed(raw.decode("utf-8", errors="replace")):
                        break
        except (aiohttp.ClientError, ConnectionError) as exc:
            if not reader.texts:
                raise _Retryable(f"{type(exc).__name__}: {exc}") from None
            log.error("model backend %s dropped the stream mid-answer: %s", self._url, exc)
            raise GenerationFailed() from None
        except _Malformed as exc:
            log.error("model backend %s sent a malformed chunk: %s", self._url, exc)
            raise GenerationFailed() from None
        if not reader.finished:
            if not reader.texts:
                raise _Retryable("the stream ended before any answer")
            log.error("model backend %s ended the stream mid-answer", self._url)
            raise GenerationFailed()
        text = "".join(reader.texts).strip()
        usage = reader.usage
        return GenerationResult(
            text=text,
            prompt_tokens=usage.get("prompt_tokens") or self.prompt_tokens(request.query, request.history),
            new_tokens=usage.get("completion_tokens") or self.count_tokens(text),
            hit_limit=reader.finish_reason == "length",
        )


class _ChunkReader:
    """Server-sent events of ``chat.completion.chunk``s -> text deltas (leading whitespace dropped,
    as the local engine does), the finish reason and the usage."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.texts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}
        self.finished = False  # [DONE], or a finish reason (some servers close without [DONE])

    def feed(self, line: str) -> bool:
        """One line of the event stream; True at ``[DONE]``."""
        line = line.strip()
        if not line.startswith("data:"):
            return False  # blank separators, comments (": keep-alive"), event names
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            self.finished = True
            return True
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise _Malformed(f"not JSON: {data[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise _Malformed(f"not an object: {data[:80]!r}")
        if "error" in chunk:
            raise _Malformed(f"an error event: {str(chunk['error'])[:200]}")
        self._usage(chunk.get("usage"))
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise _Malformed("no choices array")
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                raise _Malformed("a choice without a delta object")
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise _Malformed("delta.content is not a string")
            if content:
                if not self.texts:
                    content = content.lstrip()
                if content:
                    self.texts.append(content)
                    self._emit(TEXT, content)
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reason = reason
                self.finished = True
        return False

    def _usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            for name in ("prompt_tokens", "completion_tokens"):
                value = usage.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    self.usage[name] = value


def _tokenizer(model_path: str) -> ChatGLMTokenizer | None:
    """The ChatGLM2 tokenizer when BOT_MODEL_PATH is a folder holding one (nothing else is read)."""
    path = Path(model_path).expanduser() / TOKENIZER_FILE if model_path else None
    return ChatGLMTokenizer.from_file(path) if path is not None and path.is_file() else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (HTTP dates are rare from these servers: ignored)."""
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    return None
