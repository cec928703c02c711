"""A fake Discord on 127.0.0.1: the gateway (a websocket) and the REST endpoints the adapter uses.

The real discord.py client talks to it through ``DISCORD_API_URL`` / ``DISCORD_GATEWAY_URL``.
It keeps what a test needs to assert on: every REST call with its JSON body, the current text
of every message the bot posted (channel messages and interaction responses), gateway
identifies, resumes and heartbeats. Tests wait on conditions (``wait_for``), never on sleeps.

``faults`` (see ``Fault``) inject slow, held, failing or rate-limited answers for chosen REST
calls; the fake counts how many edits are in flight per message at once. A restarted bot can
connect again: a new gateway connection identifies afresh (a new session, as on Discord).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.adapters.injected_fault import Held, InjectedFault

DISCORD_EPOCH_MS = 1420070400000
APP_ID = 900000000000000001
BOT_ID = 900000000000000002
GUILD_ID = 900000000000000010
ADMIN_ROLE_PERMISSIONS = 1 << 13  # MANAGE_MESSAGES
MEMBER_PERMISSIONS = (1 << 10) | (1 << 11)  # VIEW_CHANNEL | SEND_MESSAGES
MESSAGE_CONTENT_INTENT = 1 << 15


def user_payload(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": name,
        "avatar": None,
        "bot": bot,
    }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py only parses a body whose content type is exactly "application/json"
    # (aiohttp's json_response appends a charset).
    return web.Response(
        status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )


@dataclass
class Call:
    method: str
    path: str  # below the API base, e.g. "/channels/1/messages"
    body: dict[str, Any] | list[Any] | None  # JSON: an object, or a list for bulk command registration
    query: dict[str, str]
    at: float = field(default_factory=time.monotonic)
    ended: float | None = None  # when the fake answered it
    status: int = 0  # what the fake answered

    @property
    def carries_content(self) -> bool:
        """A send or edit with text (anything that could mention someone)."""
        if not isinstance(self.body, dict):
            return False
        data = self.body.get("data", self.body) if "/callback" in self.path else self.body
        return isinstance(data, dict) and "content" in data


Answer = tuple[int, dict[str, Any]]  # (status, JSON body)


@dataclass
class Fault(InjectedFault[Answer]):
    """A fault (see ``InjectedFault``) for the REST calls ``when`` accepts (e.g.
    ``lambda call: call.method == "PATCH"``)."""

    when: Callable[[Call], bool]

    def applies(self, call: Call) -> bool:
        return self.open() and self.when(call)


def server_error(status: int = 500) -> Answer:
    return status, {"message": "Internal Server Error", "code": 0}


def rate_limited(retry_after: float = 1.0) -> Answer:
    return 429, {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}


def is_edit(call: Call) -> bool:
    """A message edit: a channel message or an interaction's response or follow-up."""
    return call.method == "PATCH" and "/messages/" in call.path


def content_of(call: Call) -> str | None:
    body = call.body if isinstance(call.body, dict) else {}
    data = body.get("data", body) if "/callback" in call.path else body
    content = data.get("content") if isinstance(data, dict) else None
    return content if isinstance(content, str) else None


@dataclass
class Posted:
    """A message the bot posted: a channel message, a follow-up or an interaction response."""

    id: int
    channel_id: int
    content: str
    kind: str  # "channel", "original" or "followup"
    token: str | None = None  # the interaction token, for originals and follow-ups
    reference: int | None = None  # the message it replies to
    ephemeral: bool = False
    deleted: bool = False
    edits: list[str] = field(default_factory=list)


@dataclass
class Interaction:
    id: int
    token: str
    channel_id: int
    callback: dict[str, Any] | None = None  # the body of the first (and only) callback
    expired: bool = False  # the token's 3 seconds are over: Discord answers 10062
    token_expired: bool = False  # its 15 minutes are over: the webhook calls answer 401 (50027)
    payload: dict[str, Any] = field(default_factory=dict)  # the INTERACTION_CREATE data, to replay


class FakeDiscord:
    def __init__(self, *, token: str = "test-bot-token") -> None:
        self._nonces: dict[tuple[int, str], int] = {}  # (channel, nonce) -> the message created
        self.token = token
        self.heartbeat_interval_ms = 45_000
        self.message_content_allowed = True  # False: refuse the privileged intent like Discord (4014)
        self.gateway_down = False  # True: the gateway refuses connections (HTTP 503), an outage
        self.calls: list[Call] = []
        self.posted: dict[int, Posted] = {}
        self.originals: dict[str, Posted] = {}  # interaction token -> its response
        self.interactions: dict[str, Interaction] = {}
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.registered: dict[str, list[dict[str, Any]]] = {}  # "global" or guild id -> commands
        self.session_id = "fake-session"
        self._ids = itertools.count(1)
        self._seq = 0
        self._events: list[dict[str, Any]] = []  # every dispatch sent, for RESUME replays
        self._ws: web.WebSocketResponse | None = None
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.channels: dict[int, dict[str, Any]] = {}
        self.threads: dict[int, dict[str, Any]] = {}
        self.faults: list[Fault] = []
        # message path ("/channels/1/messages/2", "/webhooks/.../@original") -> edits in flight now,
        # and the most there ever were at once
        self.edits_in_flight: dict[str, int] = {}
        self.max_edits_in_flight: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server) and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def snowflake(self, *, age_s: float = 0.0) -> int:
        """A fresh id whose timestamp is now (``age_s`` ago), as Discord's are (the adapter reads
        interaction age)."""
        return ((int((time.time() - age_s) * 1000) - DISCORD_EPOCH_MS) << 22) | next(self._ids)

    @property
    def connected(self) -> bool:
        """Whether a gateway connection is open (events sent now reach a client)."""
        return self._ws is not None and not self._ws.closed

    def add_fault(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    # -- guild setup --------------------------------------------------------------------------
    def add_channel(self) -> int:
        channel_id = self.snowflake()
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(GUILD_ID),
            "name": f"channel-{channel_id}",
            "position": len(self.channels),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        }
        return channel_id

    def add_thread(self, parent_id: int) -> int:
        thread_id = self.snowflake()
        self.threads[thread_id] = {
            "id": str(thread_id),
            "type": 11,
            "guild_id": str(GUILD_ID),
            "parent_id": str(parent_id),
            "owner_id": str(BOT_ID),
            "name": f"thread-{thread_id}",
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now_iso(),
                "locked": False,
            },
        }
        return thread_id

    # -- test helpers ---------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[], Any], within: float = 15.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every change to the fake, and every
        50 ms for state outside it); return its value."""
        try:
            async with asyncio.timeout(within), self._changed:
                while not (value := predicate()):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.05)
                return value
        except TimeoutError:
            recent = "\n".join(f"{c.method} {c.path} {str(c.body)[:150]}" for c in self.calls[-8:])
            raise AssertionError(f"timed out after {within} s; the last REST calls:\n{recent}") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        frame = {"op": 0, "t": event, "s": self._seq, "d": data}
        self._events.append(frame)
        if self._ws is not None and not self._ws.closed:
            # A frame lost to a closing socket is replayed when the client resumes.
            with contextlib.suppress(ConnectionResetError):
                await self._ws.send_str(json.dumps(frame))

    async def close_gateway(self, code: int) -> None:
        """Close the client's gateway connection with a close code, as Discord does."""
        assert self._ws is not None
        await self._ws.close(code=code, message=b"closed by the test")

    async def request_reconnect(self) -> None:
        """Gateway opcode 7: the client must reconnect and resume."""
        assert self._ws is not None
        await self._ws.send_str(json.dumps({"op": 7, "d": None}))

    def member_payload(self, user_id: int, name: str, *, permissions: int) -> dict[str, Any]:
        return {
            "user": user_payload(user_id, name),
            "roles": [],
            "joined_at": _now_iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "permissions": str(permissions),
        }

    async def slash_command(
        self,
        name: str,
        channel_id: int,
        *,
        user_id: int = 1001,
        options: dict[str, str] | None = None,
        permissions: int = MEMBER_PERMISSIONS,
        direct: bool = False,
        focused: str | None = None,
        expired: bool = False,
        age_s: float = 0.0,
    ) -> Interaction:
        """Send an INTERACTION_CREATE for ``/name`` as Discord does when a user runs it (an
        autocomplete request while they type option ``focused``, when given); ``age_s``: how long
        ago its id says it was created."""
        interaction = Interaction(
            self.snowflake(age_s=age_s), f"token-{next(self._ids)}", channel_id, expired=expired
        )
        self.interactions[interaction.token] = interaction
        payload: dict[str, Any] = interaction.payload
        payload |= {
            "id": str(interaction.id),
            "application_id": str(APP_ID),
            "type": 2 if focused is None else 4,
            "token": interaction.token,
            "version": 1,
            "locale": "en-US",
            "app_permissions": str(MEMBER_PERMISSIONS),
            "attachment_size_limit": 8 * 1024 * 1024,
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(GUILD_ID)},
            "channel_id": str(channel_id),
            "data": {
                "id": str(self.snowflake()),
                "name": name,
                "type": 1,
                "options": [
                    {"name": key, "type": 3, "value": value} | ({"focused": True} if key == focused else {})
                    for key, value in (options or {}).items()
                ],
            },
        }
        if direct:
            payload["context"] = 1
            payload["user"] = user_payload(user_id, f"user{user_id}")
            payload["channel"] = {"id": str(channel_id), "type": 1, "recipients": [payload["user"]]}
        else:
            payload["context"] = 0
            payload["guild_id"] = str(GUILD_ID)
            payload["member"] = self.member_payload(user_id, f"user{user_id}", permissions=permissions)
            payload["channel"] = self.channels.get(channel_id) or self.threads[channel_id]
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    async def replay(self, interaction: Interaction) -> None:
        """Deliver ``interaction`` again, as a gateway may after a reconnect."""
        await self.dispatch("INTERACTION_CREATE", interaction.payload)

    async def user_message(
        self,
        channel_id: int,
        content: str,
        *,
        user_id: int = 1001,
        mentions: tuple[int, ...] = (),
        bot: bool = False,
        everyone: bool = False,
        message_type: int = 0,
        direct: bool = False,
    ) -> int:
        """Send a MESSAGE_CREATE from a user (a DM when ``direct``)."""
        message_id = self.snowflake()
        payload: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": user_payload(user_id, f"user{user_id}", bot=bot),
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": everyone,
            "mentions": [user_payload(uid, "bot" if uid == BOT_ID else f"user{uid}") for uid in mentions],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": message_type,
            "flags": 0,
        }
        if not direct:
            payload["guild_id"] = str(GUILD_ID)
            payload["member"] = {
                k: v for k, v in self.member_payload(user_id, "", permissions=0).items() if k != "user"
            }
        await self.dispatch("MESSAGE_CREATE", payload)
        return message_id

    # -- what the bot did ----------------------------------------------------------------------
    def mention_leaks(self) -> list[Call]:
        """Sends and edits with text whose allowed_mentions would let anything ping."""
        leaks = []
        for call in self.calls:
            if call.carries_content:
                assert isinstance(call.body, dict)
                data = call.body.get("data", call.body) if "/callback" in call.path else call.body
                if data.get("allowed_mentions") != {"parse": []}:
                    leaks.append(call)
        return leaks

    def replies_to(self, message_id: int) -> list[Posted]:
        return [p for p in self.posted.values() if p.reference == message_id and not p.deleted]

    def bot_messages(self, channel_id: int) -> list[Posted]:
        """Every message the bot shows in ``channel_id`` (channel messages, interaction responses and
        follow-ups, not deleted), oldest first."""
        return sorted(
            (p for p in self.posted.values() if p.channel_id == channel_id and not p.deleted),
            key=lambda p: p.id,
        )

    def followups(self, token: str) -> list[Posted]:
        return [
            p for p in self.posted.values() if p.token == token and p.kind == "followup" and not p.deleted
        ]

    def answer_text(self, token: str) -> str | None:
        """An interaction's answer as the user reads it: the response, then follow-ups joined."""
        original = self.originals.get(token)
        if original is None or original.deleted:
            return None
        return "\n".join([original.content, *(p.content for p in self.followups(token))])

    # -- gateway ---------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if self.gateway_down:
            return web.Response(status=503, text="gateway unavailable")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}))
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            op, data = frame.get("op"), frame.get("d")
            if op == 1:
                self.heartbeats += 1
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:
                self.identifies.append(data)
                if data.get("intents", 0) & MESSAGE_CONTENT_INTENT and not self.message_content_allowed:
                    await ws.close(code=4014, message=b"Disallowed intent(s).")
                    break
                await self._ready()
            elif op == 6:
                self.resumes.append(data)
                await self._resume(ws, data)
            await self._notify()
        return ws

    async def _ready(self) -> None:
        await self.dispatch(
            "READY",
            {
                "v": 10,
                "user": user_payload(BOT_ID, "chatglm", bot=True),
                "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                "session_id": self.session_id,
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(APP_ID), "flags": 0},
                "private_channels": [],
                "relationships": [],
            },
        )
        await self.dispatch(
            "GUILD_CREATE",
            {
                "id": str(GUILD_ID),
                "name": "Test server",
                "owner_id": "1",
                "unavailable": False,
                "member_count": 2,
                "large": False,
                "joined_at": _now_iso(),
                "roles": [
                    {
                        "id": str(GUILD_ID),
                        "name": "@everyone",
                        "permissions": str(MEMBER_PERMISSIONS),
                        "position": 0,
                        "color": 0,
                        "hoist": False,
                        "managed": False,
                        "mentionable": False,
                        "flags": 0,
                    }
                ],
                "channels": list(self.channels.values()),
                "threads": list(self.threads.values()),
                "members": [self.member_payload(BOT_ID, "chatglm", permissions=0)],
                "emojis": [],
                "stickers": [],
                "features": [],
                "voice_states": [],
                "presences": [],
            },
        )

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if data.get("session_id") != self.session_id:
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return
        seen = data.get("seq") or 0
        for frame in self._events:
            if frame["s"] > seen:
                await ws.send_str(json.dumps(frame))
        await self.dispatch("RESUMED", {})

    # -- REST ----------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body = await request.json() if request.can_read_body else None
        call = Call(request.method, path, body, dict(request.query))
        self.calls.append(call)
        # Interaction callbacks and webhooks authenticate with the interaction token in the URL.
        authorised = request.headers.get("Authorization") == f"Bot {self.token}"
        if not authorised and not path.startswith(("/interactions/", "/webhooks/")):
            call.status, call.ended = 401, time.monotonic()
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        editing = is_edit(call)
        if editing:
            self.edits_in_flight[path] = self.edits_in_flight.get(path, 0) + 1
            self.max_edits_in_flight[path] = max(
                self.max_edits_in_flight.get(path, 0), self.edits_in_flight[path]
            )
        try:
            response = await self._faulted(call)
            call.status = response.status
            return response
        finally:
            call.ended = time.monotonic()
            if editing:
                self.edits_in_flight[path] -= 1
            await self._notify()

    async def _faulted(self, call: Call) -> web.StreamResponse:
        fault = next((f for f in self.faults if f.applies(call)), None)
        if fault is not None:
            answer = await fault.strike(self._notify)
            if isinstance(answer, Held):
                return web.Response(status=503, text="held, then cut off")
            if answer is not None:
                status, body = answer
                headers = {"Content-Type": "application/json"}
                if status == 429:
                    retry_after = str(body.get("retry_after", 1))
                    headers |= {
                        "Via": "1.1 google",  # discord.py takes a 429 without it for a Cloudflare ban
                        "Retry-After": retry_after,
                        "X-RateLimit-Scope": "user",
                        "X-RateLimit-Bucket": "fake",
                    }
                return web.Response(status=status, body=json.dumps(body).encode(), headers=headers)
        return await self._route(call)

    async def _route(self, call: Call) -> web.StreamResponse:
        parts = call.path.strip("/").split("/")
        body = call.body if isinstance(call.body, dict) else {}
        match call.method, parts:
            case "GET", ["users", "@me"]:
                return _json(user_payload(BOT_ID, "chatglm", bot=True) | {"flags": 0})
            case "GET", ["oauth2", "applications", "@me"]:
                return _json(self._application())
            case "POST", ["interactions", _, token, "callback"]:
                return self._callback(token, body)
            case "POST" | "PATCH" | "DELETE", ["webhooks", _, token, *_] if self._token_expired(token):
                return _json({"message": "Invalid Webhook Token", "code": 50027}, status=401)
            case "POST", ["webhooks", _, token]:
                interaction = self.interactions[token]
                posted = self._post(interaction.channel_id, body, kind="followup", token=token)
                return _json(self._message(posted))
            case "PATCH", ["webhooks", _, token, "messages", message]:
                posted = self.originals[token] if message == "@original" else self.posted[int(message)]
                return self._edit(posted, body)
            case "DELETE", ["webhooks", _, token, "messages", message]:
                posted = self.originals[token] if message == "@original" else self.posted[int(message)]
                posted.deleted = True
                return web.Response(status=204)
            case "POST", ["channels", channel, "messages"]:
                nonce = body.get("nonce")
                key = (int(channel), str(nonce))
                if nonce is not None and body.get("enforce_nonce") and key in self._nonces:
                    # Discord returns the message created with this nonce instead of a second one.
                    return _json(self._message(self.posted[self._nonces[key]]))
                posted = self._post(int(channel), body, kind="channel")
                if nonce is not None:
                    self._nonces[key] = posted.id
                return _json(self._message(posted))
            case "POST", ["channels", _, "typing"]:
                return web.Response(status=204)
            case "PATCH", ["channels", _, "messages", message]:
                return self._edit(self.posted[int(message)], body)
            case "DELETE", ["channels", _, "messages", message]:
                self.posted[int(message)].deleted = True
                return web.Response(status=204)
            case "PUT", ["applications", _, "commands"]:
                return _json(self._register("global", call.body if isinstance(call.body, list) else []))
            case "PUT", ["applications", _, "guilds", guild, "commands"] if guild == str(GUILD_ID):
                return _json(self._register(guild, call.body if isinstance(call.body, list) else []))
            case "PUT", ["applications", _, "guilds", _, "commands"]:  # a server the bot is not in
                return _json({"message": "Missing Access", "code": 50001}, status=403)
        return _json({"message": "404: Not Found", "code": 0}, status=404)

    def _token_expired(self, token: str) -> bool:
        interaction = self.interactions.get(token)
        return interaction is not None and interaction.token_expired

    def _application(self) -> dict[str, Any]:
        return {
            "id": str(APP_ID),
            "name": "chatglm",
            "icon": None,
            "description": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": user_payload(1, "owner"),
            "verify_key": "00",
            "flags": 0,
            "team": None,
        }

    def _callback(self, token: str, body: dict[str, Any]) -> web.Response:
        interaction = self.interactions[token]
        if interaction.expired or interaction.token_expired:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        if interaction.callback is not None:  # Discord allows one response per interaction
            return _json({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        interaction.callback = body
        data = body.get("data") or {}
        ephemeral = bool(data.get("flags", 0) & 64)
        original = Posted(
            self.snowflake(),
            interaction.channel_id,
            data.get("content", ""),
            "original",
            token,
            ephemeral=ephemeral,
        )
        self.posted[original.id] = original
        self.originals[token] = original
        return _json(
            {
                "interaction": {
                    "id": str(interaction.id),
                    "type": 2,
                    "response_message_id": str(original.id),
                    "response_message_loading": body.get("type") == 5,
                    "response_message_ephemeral": ephemeral,
                },
                "resource": {"type": body.get("type"), "message": self._message(original)},
            }
        )

    def _post(self, channel_id: int, body: dict[str, Any], *, kind: str, token: str | None = None) -> Posted:
        reference = (body.get("message_reference") or {}).get("message_id")
        ephemeral = bool(body.get("flags", 0) & 64)
        posted = Posted(
            self.snowflake(),
            channel_id,
            body.get("content", ""),
            kind,
            token,
            int(reference) if reference else None,
            ephemeral,
        )
        self.posted[posted.id] = posted
        return posted

    def _edit(self, posted: Posted, body: dict[str, Any]) -> web.Response:
        if "content" in body:
            posted.content = body["content"]
            posted.edits.append(body["content"])
        return _json(self._message(posted))

    def _message(self, posted: Posted) -> dict[str, Any]:
        return {
            "id": str(posted.id),
            "channel_id": str(posted.channel_id),
            "author": user_payload(BOT_ID, "chatglm", bot=True),
            "content": posted.content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 19 if posted.reference else 0,
            "flags": 64 if posted.ephemeral else 0,
            "webhook_id": str(APP_ID) if posted.token else None,
        }

    def _register(self, scope: str, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        registered = [
            command
            | {
                "id": str(self.snowflake()),
                "application_id": str(APP_ID),
                "version": "1",
                "default_member_permissions": None,
                "type": command.get("type", 1),
            }
            for command in commands
        ]
        self.registered[scope] = registered
        return registered
