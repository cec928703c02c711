"""A scripted OpenAI-compatible server on 127.0.0.1 for the backend tests (aiohttp).

Each chat request takes the next behaviour from ``plan`` (then ``default``): ``stream`` (the answer in
word chunks, a finish reason, usage, ``[DONE]``), ``429`` / ``500`` (with ``retry_after``), ``stall``
(the role chunk, then nothing), ``disconnect`` (two chunks, then the connection is dropped),
``malformed`` (a chunk that is not JSON) or ``error_event`` (an ``{"error": ...}`` chunk).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket

from aiohttp import web

ANSWER = "Hello there, this is the fake server speaking."


class FakeOpenAI:
    def __init__(self, *, default: str = "stream", answer: str = ANSWER, model: str = "fake-model") -> None:
        self.plan: list[str] = []
        self.default = default
        self.answer = answer
        self.model = model
        self.retry_after = "0.05"
        self.chunk_delay_s = 0.0
        self.requests: list[dict[str, object]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnects = 0  # handlers ended by the client going away
        self.disconnected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        with socket.socket() as sock:  # a free port (aiohttp does not report the one it picked)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        behaviour = self.plan.pop(0) if self.plan else self.default
        if behaviour in ("429", "500"):
            error = {"error": {"message": "nope", "type": "server_error", "param": None, "code": None}}
            return web.json_response(error, status=int(behaviour), headers={"Retry-After": self.retry_after})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await self._send(response, {"role": "assistant", "content": ""})
            await self._behave(behaviour, request, response)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            self.disconnected.set()
            raise
        return response

    async def _behave(self, behaviour: str, request: web.Request, response: web.StreamResponse) -> None:
        pieces = re.findall(r"\s*\S+", self.answer)
        if behaviour == "stall":
            await asyncio.sleep(3600)
        elif behaviour == "malformed":
            await self._send(response, {"content": pieces[0]})
            await response.write(b"data: {this is not json\n\n")
            await asyncio.sleep(3600)
        elif behaviour == "error_event":
            await response.write(b'data: {"error": {"message": "backend exploded"}}\n\n')
        elif behaviour == "disconnect":
            for piece in pieces[:2]:
                await self._send(response, {"content": piece})
            assert request.transport is not None
            request.transport.close()
        else:
            for piece in pieces:
                await self._send(response, {"content": piece})
            await self._send(response, {}, finish_reason="length")
            usage = {"prompt_tokens": 11, "completion_tokens": len(pieces), "total_tokens": 11 + len(pieces)}
            await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")

    async def _send(
        self, response: web.StreamResponse, delta: dict[str, str], finish_reason: str | None = None
    ) -> None:
        if self.chunk_delay_s:
            await asyncio.sleep(self.chunk_delay_s)
        chunk = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
