"""A fake Slack on 127.0.0.1: the Web API methods the adapter uses, a Socket Mode websocket and
a response_url endpoint, as one aiohttp app that records every call.

It keeps the messages it was asked to post and edit, so a test can read a thread the way a
user would see it. Tests wait on conditions (``wait_for``), never on sleeps.

``faults`` (see ``Fault``) inject slow, held, failing or rate-limited answers for chosen calls; the
fake counts how many ``chat.update`` calls are in flight per message at once. A restarted bot can
connect again: nothing is kept per connection but the current websocket.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from aiohttp import WSMsgType, web

from tests.adapters.injected_fault import Held, InjectedFault

BOT_TOKEN = "xoxb-test-token"
APP_TOKEN = "xapp-test-token"
CONFIG_TOKEN = "xoxe.xoxp-test-config-token"  # an app configuration token (apps.manifest.*)
APP_ID = "A1"
SIGNING_SECRET = "test-signing-secret"
BOT_USER_ID = "UBOT"
TEAM_ID = "T1"


PLACEHOLDER = ":hourglass_flowing_sand: _thinking…_"  # adapters.slack_reply.PLACEHOLDER
Answer = tuple[int, dict[str, Any] | str, dict[str, str]]  # (status, body, headers)


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None
    at: float = field(default_factory=time.monotonic)
    ended: float | None = None  # when the fake answered it
    status: int = 200  # what the fake answered


@dataclass
class Message:
    channel: str
    ts: str
    thread_ts: str | None
    text: str
    edits: list[str] = field(default_factory=list)  # every text it has shown, in order
    deleted: bool = False
    metadata: dict[str, Any] | None = None


@dataclass
class Fault(InjectedFault[Answer]):
    """A fault (see ``InjectedFault``) for the calls of ``method`` whose params ``when`` accepts
    (all, without ``when``)."""

    method: str
    when: Callable[[dict[str, Any]], bool] | None = None

    def applies(self, method: str, params: dict[str, Any]) -> bool:
        return self.open() and method == self.method and (self.when is None or self.when(params))


def server_error(status: int = 500) -> Answer:
    return status, {"ok": False, "error": "internal_error"}, {}


def rate_limited(retry_after: float = 1) -> Answer:
    return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": f"{retry_after:g}"}


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.messages: dict[tuple[str, str], Message] = {}
        self.responses: list[dict[str, Any]] = []  # what slash commands sent to response_url
        self.acks: dict[str, float] = {}  # Socket Mode envelope_id -> when its ack arrived
        self.acks_payload: dict[str, Any] = {}
        # method -> queued (status, body, headers) answers that replace the normal one; a str body
        # is sent as is, with the headers' Content-Type (a proxy's text/plain or HTML error page)
        self.failures: dict[str, list[tuple[int, dict[str, Any] | str, dict[str, str]]]] = {}
        self.faults: list[Fault] = []
        # (channel, ts) -> chat.update calls in flight for it now, and the most there ever were
        self.updates_in_flight: dict[tuple[str, str], int] = {}
        self.max_updates_in_flight: dict[tuple[str, str], int] = {}
        self.connections = 0  # Socket Mode websockets opened so far
        self.socket_url: str | None = None  # what apps.connections.open gives instead of /socket
        # What auth.test's x-oauth-scopes header lists (None: no header), and the app's live manifest
        # (apps.manifest.export); both start as adapters/slack_manifest.yaml has them.
        shipped = resources.files("adapters").joinpath("slack_manifest.yaml").read_text()
        self.manifest: dict[str, Any] = yaml.safe_load(shipped)
        self.scopes: list[str] | None = list(self.manifest["oauth_config"]["scopes"]["bot"])
        self.socket: web.WebSocketResponse | None = None
        self._ts = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/socket", self._websocket)
        app.router.add_post("/respond/{id}", self._respond)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return self.base_url + "/api/"

    # --- what tests read --------------------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    @property
    def writes(self) -> list[Call]:
        """Calls that change what users see (everything but lookups)."""
        return [
            c for c in self.calls if c.method in ("chat.postMessage", "chat.update", "chat.postEphemeral")
        ]

    def thread(self, channel: str, thread_ts: str | None) -> list[Message]:
        """The bot's messages in a thread (or at a channel's top level for None), oldest first."""
        found = [
            m
            for m in self.messages.values()
            if m.channel == channel and m.thread_ts == thread_ts and not m.deleted
        ]
        return sorted(found, key=lambda m: float(m.ts))

    def thread_text(self, channel: str, thread_ts: str | None) -> list[str]:
        return [m.text for m in self.thread(channel, thread_ts)]

    def bot_messages(self, channel: str, *, deleted: bool = False) -> list[Message]:
        """Every message the bot posted in ``channel``, in any thread, oldest first (deleted ones
        too when ``deleted``)."""
        found = [m for m in self.messages.values() if m.channel == channel and (deleted or not m.deleted)]
        return sorted(found, key=lambda m: float(m.ts))

    def add_fault(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    async def wait_for(self, predicate: Callable[[], bool], deadline_s: float = 10.0) -> None:
        async with asyncio.timeout(deadline_s), self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- Socket Mode ----------------------------------------------------------------------

    async def send_envelope(
        self, payload: dict[str, Any], *, kind: str = "events_api", retry_attempt: int = 0
    ) -> tuple[str, float]:
        """Send one envelope over the websocket; returns (envelope_id, when it was sent)."""
        await self.wait_for(lambda: self.socket is not None and not self.socket.closed)
        assert self.socket is not None
        envelope_id = str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind != "events_api",
            "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "",
        }
        sent = time.monotonic()
        await self.socket.send_str(json.dumps(envelope))
        return envelope_id, sent

    async def wait_ack(self, envelope_id: str, deadline_s: float = 10.0) -> float:
        await self.wait_for(lambda: envelope_id in self.acks, deadline_s)
        return self.acks[envelope_id]

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.socket = ws
        self.connections += 1
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1}))
        await self._notify()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "envelope_id" in data:
                    self.acks[data["envelope_id"]] = time.monotonic()
                    self.acks_payload[data["envelope_id"]] = data.get("payload")
                    await self._notify()
        if self.socket is ws:
            self.socket = None
        return ws

    # --- Web API ------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                params.update(await request.json())
            else:
                params.update(await request.post())
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth else params.pop("token", None)
        call = Call(method, params, token)
        self.calls.append(call)
        key = (str(params.get("channel")), str(params.get("ts")))
        if method == "chat.update":
            self.updates_in_flight[key] = self.updates_in_flight.get(key, 0) + 1
            self.max_updates_in_flight[key] = max(
                self.max_updates_in_flight.get(key, 0), self.updates_in_flight[key]
            )
        try:
            status, body, headers = await self._faulted(method, params, token)
            call.status = status
            if isinstance(body, str):
                return web.Response(body=body.encode(), status=status, headers=headers)
            return web.json_response(body, status=status, headers=headers)
        finally:
            call.ended = time.monotonic()
            if method == "chat.update":
                self.updates_in_flight[key] -= 1
            await self._notify()

    async def _faulted(self, method: str, params: dict[str, Any], token: str | None) -> Answer:
        if self.failures.get(method):
            return self.failures[method].pop(0)
        fault = next((f for f in self.faults if f.applies(method, params)), None)
        answer = await fault.strike(self._notify) if fault is not None else None
        if isinstance(answer, Held):
            return 503, "held, then cut off", {"Content-Type": "text/plain"}
        if answer is not None:
            return answer
        headers: dict[str, str] = {}
        if method == "auth.test" and token == BOT_TOKEN and self.scopes is not None:
            headers["x-oauth-scopes"] = ",".join(self.scopes)
        return 200, self._answer(method, params, token), headers

    def _answer(self, method: str, params: dict[str, Any], token: str | None) -> dict[str, Any]:
        if method == "apps.connections.open":
            if token != APP_TOKEN:
                return {"ok": False, "error": "invalid_auth"}
            return {"ok": True, "url": self.socket_url or self.base_url.replace("http", "ws", 1) + "/socket"}
        if method == "apps.manifest.export":
            if token != CONFIG_TOKEN:
                return {"ok": False, "error": "invalid_auth"}
            if params.get("app_id") != APP_ID:
                return {"ok": False, "error": "invalid_app_id"}
            return {"ok": True, "manifest": self.manifest}
        if token != BOT_TOKEN:
            return {"ok": False, "error": "invalid_auth"}
        if method == "auth.test":
            return {"ok": True, "user_id": BOT_USER_ID, "bot_id": "B1", "team_id": TEAM_ID, "user": "chatglm"}
        if method == "users.info":
            user = params["user"]
            return {
                "ok": True,
                "user": {"id": user, "name": user.lower(), "profile": {"display_name": f"{user}-name"}},
            }
        if method == "chat.postMessage":
            ts = f"{1_700_000_000 + next(self._ts)}.000100"
            channel, text = params["channel"], params["text"]
            metadata = params.get("metadata")
            if isinstance(metadata, str):  # form-encoded calls send it as JSON text
                metadata = json.loads(metadata)
            self.messages[(channel, ts)] = Message(
                channel, ts, params.get("thread_ts"), text, [text], metadata=metadata
            )
            return {"ok": True, "channel": channel, "ts": ts, "message": {"text": text, "ts": ts}}
        if method == "chat.update":
            message = self.messages.get((params["channel"], params["ts"]))
            if message is None or message.deleted:
                return {"ok": False, "error": "message_not_found"}
            message.text = params["text"]
            message.edits.append(params["text"])
            return {"ok": True, "channel": message.channel, "ts": message.ts, "text": message.text}
        if method == "chat.delete":
            message = self.messages.get((params["channel"], params["ts"]))
            if message is None or message.deleted:
                return {"ok": False, "error": "message_not_found"}
            message.deleted = True
            return {"ok": True, "channel": message.channel, "ts": message.ts}
        if method in ("conversations.replies", "conversations.history"):
            # Only the bot's own messages are kept here; a thread (replies) or the top level (history).
            thread = params.get("ts") if method == "conversations.replies" else None
            oldest = float(params.get("oldest") or 0)
            found = sorted(
                (
                    m
                    for m in self.messages.values()
                    if m.channel == params["channel"]
                    and m.thread_ts == thread
                    and not m.deleted
                    and float(m.ts) > oldest
                ),
                key=lambda m: float(m.ts),
            )
            return {
                "ok": True,
                "messages": [
                    {"type": "message", "ts": m.ts, "text": m.text, "bot_id": "B1"}
                    | ({"metadata": m.metadata} if m.metadata and params.get("include_all_metadata") else {})
                    for m in found
                ],
            }
        return {"ok": False, "error": "unknown_method"}

    async def _respond(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        await self._notify()
        return web.Response(text="ok")


# --- payload builders ----------------------------------------------------------------------

_event_ids = itertools.count(1)
_ts = itertools.count(1)


def new_ts() -> str:
    return f"{1_600_000_000 + next(_ts)}.000200"


def event_body(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM_ID,
        "api_app_id": APP_ID,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or f"Ev{next(_event_ids):08d}",
        "event_time": int(time.time()),
        "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True}],
    }


def mention(
    text: str, *, channel: str = "C1", user: str = "U1", ts: str | None = None, thread_ts: str | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "app_mention",
        "user": user,
        "text": f"<@{BOT_USER_ID}> {text}",
        "ts": ts or new_ts(),
        "channel": channel,
        "event_ts": ts,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def message(
    text: str,
    *,
    channel: str = "C1",
    user: str = "U1",
    channel_type: str = "channel",
    thread_ts: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "message",
        "user": user,
        "text": text,
        "ts": new_ts(),
        "channel": channel,
        "channel_type": channel_type,
        **extra,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def sign(body: str | bytes, *, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(secret.encode(), b"v0:%s:%s" % (ts.encode(), raw), hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": "application/json",
    }
