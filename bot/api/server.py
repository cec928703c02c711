"""The OpenAI-compatible HTTP API over the same ``ModelService`` the bot uses (one inference thread,
batching, the bounded queue). The port is bound before the model loads: meanwhile ``/healthz`` and
the ``/v1`` routes answer 503. Requests carry no conversation key, so the prefix cache matches each
prompt against the recently served ones by tokens (``bot.model.prefix_cache``)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from bot import http
from bot.api.errors import ApiError, bad_request
from bot.api.schema import ChatCompletionRequest, parse_chat_request
from bot.api.stop import StopText
from bot.config import Settings
from bot.generation import GenerationRequest, GenerationResult
from bot.service import (
    GenerationTimeout,
    ModelService,
    ServiceBusy,
    ServiceClosed,
    ServiceError,
    Stream,
)

log = logging.getLogger(__name__)

RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_LOADING_S = 5
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def model_name(settings: Settings) -> str:
    """The name /v1/models lists: the checkpoint folder's name (or a hub id's last part)."""
    return Path(settings.model_path.strip().rstrip("/")).name or settings.model_path


class ApiServer:
    def __init__(self, settings: Settings, service: ModelService) -> None:
        self._settings = settings
        self._service = service
        self._model = model_name(settings)
        self._created = int(time.time())
        self.loaded = False
        self.app = http.create_app(self._health)
        self.app.middlewares.append(self._errors)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/v1/chat/completions", self._chat_completions)

    async def _health(self) -> dict[str, object]:
        if not self.loaded:
            return {"status": "starting", "model": "loading"}
        return {
            "model": "loaded",
            "queue_depth": self._service.queue_depth,
            "in_flight": self._service.in_flight,
        }

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bearer-token check and OpenAI-shaped errors for the /v1 routes."""
        if not request.path.startswith("/v1/"):
            return await handler(request)
        try:
            self._authorize(request)
            if not self.loaded:
                raise ApiError(
                    503,
                    "The model is still loading; retry in a few seconds.",
                    type="server_error",
                    code="model_loading",
                    headers={"Retry-After": str(RETRY_AFTER_LOADING_S)},
                )
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:  # unknown route or method: still OpenAI's shape
            return ApiError(exc.status, exc.reason, code=str(exc.status)).response()

    def _authorize(self, request: web.Request) -> None:
        key = self._settings.api_key
        if key is None or not key.get_secret_value():
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expected = key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(
                401,
                "Invalid or missing API key: send it as 'Authorization: Bearer <BOT_API_KEY>'.",
                code="invalid_api_key",
            )

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": self._model, "object": "model", "created": self._created, "owned_by": "chatglm-bot"}
        return web.json_response({"object": "list", "data": [entry]})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the body is not valid JSON: {exc}") from None
        parsed = parse_chat_request(body, self._settings)
        service = self._service
        prompt_tokens = service.prompt_tokens(parsed.query, parsed.history)
        if prompt_tokens >= service.max_context_tokens:
            raise bad_request(
                f"the prompt is {prompt_tokens} tokens; the model's context is {service.max_context_tokens}",
                "messages",
                "context_length_exceeded",
            )
        generation = GenerationRequest(query=parsed.query, history=parsed.history, params=parsed.params)
        try:
            stream = service.stream(generation)
        except ServiceBusy as exc:
            raise ApiError(
                429,
                str(exc),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
            ) from None
        except ServiceClosed as exc:
            raise _service_error(exc) from None
        completion = _Completion(parsed, self._model, prompt_tokens)
        try:
            if parsed.stream:
                return await self._stream(request, stream, completion)
            return await self._complete(stream, completion)
        finally:
            stream.cancel()  # a no-op once finished; else the client left or a stop sequence was hit

    async def _complete(self, stream: Stream, completion: _Completion) -> web.Response:
        try:
            async for delta in stream:
                completion.push(delta)
                if completion.stop.stopped:
                    break
        except ServiceError as exc:
            raise _service_error(exc) from None
        completion.finish(stream.result, self._service.count_tokens)
        return web.json_response(completion.response())

    async def _stream(
        self, request: web.Request, stream: Stream, completion: _Completion
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(payload: dict[str, object]) -> None:
            await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

        try:
            await send(completion.chunk({"role": "assistant", "content": ""}))
            try:
                async for delta in stream:
                    text = completion.push(delta)
                    if text:
                        await send(completion.chunk({"content": text}))
                    if completion.stop.stopped:
                        break
            except ServiceError as exc:  # the status line is sent: report it as an error event
                await send(_service_error(exc).body())
                return response
            tail = completion.finish(stream.result, self._service.count_tokens)
            if tail:
                await send(completion.chunk({"content": tail}))
            await send(completion.chunk({}, completion.finish_reason))
            if completion.include_usage:
                await send(completion.usage_chunk())
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:  # the client went away: the caller cancels the generation
            log.info("API client disconnected; its generation is cancelled")
        return response


class _Completion:
    """One response's state: the text so far (cut at a stop sequence), usage, finish reason."""

    def __init__(self, request: ChatCompletionRequest, model: str, prompt_tokens: int) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = request.include_usage
        self.stop = StopText(request.stop)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason = "stop"

    def push(self, delta: str) -> str:
        return self.stop.push(delta)

    def finish(self, result: GenerationResult | None, count_tokens: Callable[[str], int]) -> str:
        """The held-back tail; sets usage and the finish reason. ``result`` is None when a stop
        sequence ended the generation early: its tokens are counted from the text then."""
        tail = self.stop.finish()
        if result is None or self.stop.stopped:
            self.completion_tokens = count_tokens(self.stop.text)
            self.finish_reason = "stop"
        else:
            self.prompt_tokens = result.prompt_tokens
            self.completion_tokens = result.new_tokens
            self.finish_reason = "length" if result.hit_limit else "stop"
        return tail

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def _envelope(self, kind: str) -> dict[str, object]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self) -> dict[str, object]:
        message = {"role": "assistant", "content": self.stop.text}
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": self.usage()}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, object]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self) -> dict[str, object]:
        return {**self._envelope("chat.completion.chunk"), "choices": [], "usage": self.usage()}


def _service_error(exc: ServiceError) -> ApiError:
    if isinstance(exc, GenerationTimeout):
        return ApiError(504, str(exc), type="server_error", code="timeout")
    if isinstance(exc, ServiceClosed):
        return ApiError(503, str(exc), type="server_error", code="shutting_down")
    return ApiError(500, str(exc), type="server_error", code=type(exc).__name__)


async def run(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT."""
    from bot.app import _check_context, _export_model_metrics, model_factory

    service = ModelService(
        model_factory(settings), queue_size=settings.queue_size, timeout_s=settings.request_timeout_s
    )
    api = ApiServer(settings, service)
    # Cancelling a handler when its client disconnects cancels a non-streamed generation too.
    runner = await http.start_server(api.app, host, port, setting="BOT_API", handler_cancellation=True)
    try:
        log.info("loading the model from %s", settings.model_path)
        await service.start()
        _check_context(settings, service.max_context_tokens)
        _export_model_metrics(settings, service.generator)
        api.loaded = True
        log.info(
            "OpenAI-compatible API ready at http://%s:%d/v1 (model %s)", host, port, model_name(settings)
        )
        await _wait_for_signal()
    finally:
        await runner.cleanup()
        await service.close()


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
