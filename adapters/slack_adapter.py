"""The Slack adapter: slack-bolt's AsyncApp over the HTTP Events API or Socket Mode.

It translates only. Each event becomes the neutral message and is handed to the core, which records
it, before Slack gets its acknowledgement (bolt's ``process_before_response``: the listener runs
first, and does nothing slow): an acknowledged event is never lost, whatever is killed next. User
names are looked up afterwards (``resolve``), when the core asks. Slack's ``event_id`` becomes the
message's ``event_id``: the core records it, so a retry (``x-slack-retry-num``, in either mode),
even one arriving after a restart, is never answered twice. While the bot shuts down, HTTP events
get 503 with Retry-After, so Slack redelivers them to the next process. Over HTTP a request's signature is
checked on its raw bytes before anything parses them (401), a signed but malformed body is a 400,
and a request no listener handles (another event type, ``app_rate_limited``) a 200, so Slack does
not retry it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.error import BoltUnhandledRequestError
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_events import (
    EVENTS_PATH,
    PLATFORM,
    command_message,
    deleted_message,
    mentioned_users,
    parse_command,
    slack_markup_to_text,
    to_message,
)
from adapters.slack_reply import (
    Respond,
    SlackEphemeralReply,
    SlackFailure,
    SlackReply,
    TransientRetryHandler,
    api_error_reason,
    call_slack,
    escape,
    try_slack,
)
from bot.config import ConfigError, Settings
from bot.events import Command, Core, IncomingMessage, PlatformUnreachable, ReplyHandle

log = logging.getLogger(__name__)

SLASH_COMMAND = "/chatglm"
CONNECT_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0
RETRY_AFTER_S = "5"  # what a 503 while shutting down tells Slack
MAX_CACHED_NAMES = 10_000
MAX_TRACKED_QUESTIONS = 10_000
NAME_RETRY_S = 300.0  # after a failed users.info, ids stay ids this long before it is asked again
NOT_IN_CHANNEL = "I can't post in this channel. Invite me first (`/invite @ChatGLM`), then try again."


class SlackAdapter:
    platform = PLATFORM

    def __init__(
        self,
        settings: Settings,
        http_app: web.Application | None,
        *,
        min_edit_interval: float = 1.0,
    ) -> None:
        if settings.slack_bot_token is None:
            raise ConfigError("SLACK_BOT_TOKEN is required for the Slack adapter")
        self._app_token = settings.slack_app_token
        self._socket_mode = self._app_token is not None
        if not self._socket_mode and settings.slack_signing_secret is None:
            raise ConfigError("SLACK_SIGNING_SECRET is required in HTTP mode (or set SLACK_APP_TOKEN)")
        if not self._socket_mode and http_app is None:
            raise ConfigError("the Slack HTTP mode needs the bot's HTTP server")
        self._settings = settings
        self._min_edit_interval = min_edit_interval
        self._client = AsyncWebClient(
            token=settings.slack_bot_token.get_secret_value(),
            base_url=_with_slash(settings.slack_api_url),
            retry_handlers=[TransientRetryHandler()],
        )
        secret = settings.slack_signing_secret
        self._verifier = _BytesSignatureVerifier(secret.get_secret_value()) if secret else None
        self._app = AsyncApp(
            client=self._client,
            # Socket Mode envelopes are not signed; bolt skips verification for them.
            signing_secret=secret.get_secret_value() if secret else "",
            name="chatglm-bot",
            # Unhandled requests reach _on_error, which answers 200 rather than bolt's 404.
            raise_error_for_unhandled_request=True,
            # Ack only after the listener has handed the event to the core (which records it).
            process_before_response=True,
        )
        self._app.error(self._on_error)
        self._app.event("app_mention")(self._on_event)
        self._app.event("message")(self._on_event)
        self._app.command(SLASH_COMMAND)(self._on_command)
        self._core: Core | None = None
        self._bot_user_id = ""
        self._names: dict[str, str] = {}
        self._names_failed: dict[str, float] = {}  # user id -> when users.info may be asked again
        self._tasks: set[asyncio.Task[None]] = set()
        # (channel, question ts) -> its event id, so deleting the question cancels its answer.
        self._questions: dict[tuple[str, str], str] = {}
        self._socket: AsyncSocketModeHandler | None = None
        if not self._socket_mode and http_app is not None:
            http_app.router.add_post(EVENTS_PATH, self._on_http)

    async def start(self, core: Core) -> None:
        try:
            response = await self._client.auth_test()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PlatformUnreachable(
                f"cannot reach Slack at {self._client.base_url}: {type(exc).__name__}"
            ) from None
        except SlackApiError as exc:
            reason = api_error_reason(exc.response)
            if getattr(exc.response, "status_code", 0) >= 500:  # a proxy or Slack itself is down
                raise PlatformUnreachable(f"Slack at {self._client.base_url} answered {reason}") from None
            raise ConfigError(f"Slack rejected SLACK_BOT_TOKEN (auth.test: {reason})") from None
        if response is None or not response.get("user_id"):
            raise ConfigError("Slack rejected SLACK_BOT_TOKEN (auth.test failed; see the log)")
        self._bot_user_id = str(response["user_id"])
        if self._app_token is not None:
            await self._connect_socket(self._app_token.get_secret_value())
        self._core = core
        log.info("Slack adapter running (%s) as %s", self.mode, self._bot_user_id)

    def connection(self) -> str:
        if self._socket is None:
            return "connected"  # HTTP events: Slack calls in, there is nothing to keep open
        session = getattr(self._socket.client, "current_session", None)
        return "connected" if session is not None and not session.closed else "reconnecting"

    async def lost(self) -> None:
        # slack_sdk's Socket Mode client reconnects by itself, with no end: "reconnecting" says so.
        await asyncio.get_running_loop().create_future()

    @property
    def mode(self) -> str:
        return "socket mode" if self._socket_mode else f"HTTP {EVENTS_PATH}"

    async def stop(self) -> None:
        self._core = None
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
            self._socket = None
        # Slash commands about to hand their question in (a quote being posted) get a moment.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_GRACE_S)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> ReplyHandle | None:
        channel = message.raw.get("channel")
        if not isinstance(channel, str) or message.raw.get("ephemeral"):
            return None  # a slash command's response_url is short-lived and never stored
        thread_ts = message.raw.get("thread_ts")
        thread = thread_ts if isinstance(thread_ts, str) else None
        posted = handle.get("ts") if handle is not None else None
        posted = [ts for ts in posted if isinstance(ts, str)] if isinstance(posted, list) else []
        question_ts = message.raw.get("ts") or thread
        # "{}": a placeholder may have been posted by a run that died before storing its ts.
        find_after = str(question_ts) if handle == {} and question_ts else None
        return self._reply(channel, thread, message.event_id, posted, find_after)

    async def resolve(self, message: IncomingMessage) -> IncomingMessage:
        """The author's and mentioned users' display names (``users.info``, cached)."""
        source = message.raw.get("source_text")
        if not isinstance(source, str):
            return message
        names = await self._names_for({message.author_id, *mentioned_users(source)} - {self._bot_user_id})
        return replace(
            message,
            author_name=names.get(message.author_id, message.author_id),
            text=slack_markup_to_text(source, self._bot_user_id, names),
        )

    # --- connection -----------------------------------------------------------------------

    async def _connect_socket(self, app_token: str) -> None:
        # Open the first connection URL here: the SDK's own connect() retries forever, which
        # would hide a wrong SLACK_APP_TOKEN behind an endless retry loop.
        opened = await try_slack(
            "apps.connections.open", self._client.apps_connections_open(app_token=app_token)
        )
        if isinstance(opened, SlackFailure):
            if opened.reason.startswith(("no response", "HTTP 5")):  # the network, not the token
                raise PlatformUnreachable(f"cannot open Slack Socket Mode: {opened.reason}")
            raise ConfigError(f"Slack rejected SLACK_APP_TOKEN (apps.connections.open: {opened.reason})")
        if not opened.get("url"):
            raise ConfigError("Slack rejected SLACK_APP_TOKEN (apps.connections.open gave no URL)")
        self._socket = AsyncSocketModeHandler(self._app, app_token)
        self._socket.client.wss_uri = str(opened["url"])
        try:
            await asyncio.wait_for(self._socket.connect_async(), CONNECT_TIMEOUT_S)  # type: ignore[no-untyped-call]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
            self._socket = None
            raise PlatformUnreachable(
                f"could not open the Slack Socket Mode websocket ({type(exc).__name__})"
            ) from None

    async def _on_http(self, request: web.Request) -> web.StreamResponse:
        if self._core is None or not self._core.accepting:  # starting or stopping: Slack retries
            return web.Response(status=503, text="not ready", headers={"Retry-After": RETRY_AFTER_S})
        raw = await request.read()
        # Verified here on the raw bytes, before anything parses them, so a forged request is a
        # 401 whatever its body; bolt's middleware verifies again.
        if not self._signed(raw, request.headers):
            return web.Response(status=401, text="invalid signature")
        try:
            bolt_request = AsyncBoltRequest(
                body=raw.decode("utf-8"),
                query=request.query_string,
                headers={key: request.headers.getall(key) for key in request.headers},
            )
        except UnicodeDecodeError:
            return web.Response(status=400, text="malformed request: body is not UTF-8")
        except ValueError:
            return web.Response(status=400, text="malformed request: body is not valid JSON")
        return await to_aiohttp_response(await self._app.async_dispatch(bolt_request))

    def _signed(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        timestamp = headers.get("X-Slack-Request-Timestamp")
        signature = headers.get("X-Slack-Signature")
        if self._verifier is None or timestamp is None or not (timestamp.isascii() and timestamp.isdigit()):
            return False  # the verifier's int() would raise on a non-numeric timestamp
        return self._verifier.is_valid(body=raw, timestamp=timestamp, signature=signature)

    async def _on_error(self, error: Exception, body: Mapping[str, Any]) -> BoltResponse | None:
        if isinstance(error, BoltUnhandledRequestError):
            # Event types the bot does not subscribe to and app_rate_limited notices: a 404 would
            # make Slack retry them and count failures against the app.
            event = body.get("event")
            kind = event.get("type") if isinstance(event, Mapping) else None
            log.debug("ignoring a Slack request no listener handles: %s %s", body.get("type"), kind or "")
            return BoltResponse(status=200, body="")
        log.error("a Slack listener failed", exc_info=error)
        return None  # bolt answers 500

    # --- listeners (the ack path: nothing slow here) -----------------------------------------

    async def _on_event(self, body: dict[str, Any]) -> None:
        core = self._core
        if core is None:
            return
        deleted = deleted_message(body)
        if deleted is not None:
            event_id = self._questions.pop(deleted, None)
            if event_id is not None:  # the question is gone: stop writing its answer
                core.cancel(PLATFORM, event_id)
            return
        follow = self._settings.slack_thread_followups
        message = to_message(body, self._bot_user_id, {}, thread_followups=follow)
        if message is None:
            return
        channel, thread_ts = message.raw["channel"], message.raw["thread_ts"]
        if len(self._questions) > MAX_TRACKED_QUESTIONS:
            self._questions.clear()
        self._questions[(channel, str(message.raw["ts"]))] = message.event_id
        await core.submit(message, self._reply(channel, thread_ts, message.event_id))

    async def _on_command(self, ack: Any, body: dict[str, Any], respond: Respond) -> None:
        await ack()
        self._spawn(self._deliver_command(body, respond))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- background delivery -------------------------------------------------------------------

    async def _deliver_command(self, body: Mapping[str, Any], respond: Respond) -> None:
        command, prompt = parse_command(str(body.get("text") or ""))
        user, channel = body.get("user_id"), body.get("channel_id")
        if not isinstance(user, str) or not isinstance(channel, str):
            return
        if command != Command.CHAT:
            message = command_message(body, command, command.value, None)
            if message is not None:
                await self._handle(message, SlackEphemeralReply(respond))
            return
        # A slash command is invisible to others: quote it, and answer in the quote's thread
        # (at the top level of a DM, whose single conversation it joins).
        quote = f"<@{user}> asked: {escape(prompt)}"
        posting = self._client.chat_postMessage(channel=channel, text=quote, unfurl_links=False)
        posted = await try_slack("chat.postMessage", posting)
        if isinstance(posted, SlackFailure):
            # Only these codes mean an invitation would help; anything else is said as it is.
            if posted.reason in ("error: not_in_channel", "error: channel_not_found"):
                await SlackEphemeralReply(respond).fail(NOT_IN_CHANNEL)
            else:
                await SlackEphemeralReply(respond).fail(
                    f"Slack refused to post your question ({posted.reason})."
                )
            return
        thread_ts = None if channel.startswith("D") else str(posted["ts"])
        message = command_message(body, command, prompt, thread_ts)
        if message is not None:
            await self._handle(message, self._reply(channel, thread_ts, message.event_id))

    async def _handle(self, message: IncomingMessage, reply: ReplyHandle) -> None:
        core = self._core
        if core is None:
            return
        try:
            await core.submit(message, reply)
        except Exception:
            log.exception("handing Slack event %s to the core failed", message.event_id)
            await reply.fail("Something went wrong; please try again.")

    async def _names_for(self, user_ids: set[str]) -> dict[str, str]:
        """Display names, cached. Where ``users.info`` fails (no users:read, an outage) the id stays an
        id, and is asked about again only after ``NAME_RETRY_S``: a transient failure is not final,
        and a missing scope does not cost a call per message."""
        if len(self._names) > MAX_CACHED_NAMES:
            self._names.clear()
        if len(self._names_failed) > MAX_CACHED_NAMES:
            self._names_failed.clear()
        now = time.monotonic()
        for user_id in user_ids - self._names.keys():
            if self._names_failed.get(user_id, now) > now:
                continue
            info = await call_slack("users.info", self._client.users_info(user=user_id))
            name = _display_name(info.get("user") if info is not None else None)
            if name:
                self._names[user_id] = name
                self._names_failed.pop(user_id, None)
            else:
                self._names_failed[user_id] = now + NAME_RETRY_S
        return {user_id: self._names.get(user_id, user_id) for user_id in user_ids}

    def _reply(
        self,
        channel: str,
        thread_ts: str | None,
        event_id: str,
        posted: list[str] | None = None,
        find_after: str | None = None,
    ) -> SlackReply:
        return SlackReply(
            self._client,
            channel,
            thread_ts,
            min_edit_interval=self._min_edit_interval,
            posted=posted,
            event_id=event_id,
            find_after=find_after,
        )


class _BytesSignatureVerifier(SignatureVerifier):
    """Signs the raw bytes, as Slack does: the SDK's version decodes them as UTF-8 first, so it
    raises on exactly the bodies that must be rejected before anything decodes them."""

    def generate_signature(self, *, timestamp: str, body: str | bytes) -> str:
        raw = body.encode("utf-8") if isinstance(body, str) else body
        digest = hmac.new(
            self.signing_secret.encode(), b"v0:%s:%s" % (timestamp.encode(), raw), hashlib.sha256
        )
        return f"v0={digest.hexdigest()}"


def _display_name(user: object) -> str | None:
    if not isinstance(user, Mapping):
        return None
    profile = user.get("profile")
    profile = profile if isinstance(profile, Mapping) else {}
    for name in (profile.get("display_name"), profile.get("real_name"), user.get("name")):
        if isinstance(name, str) and name.strip():
            return name.strip()
    return None


def _with_slash(url: str) -> str:
    # slack_sdk joins method names onto the base URL: ".../api" + "chat.update" would be wrong.
    return url if url.endswith("/") else url + "/"
