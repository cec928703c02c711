"""The fault-injection harness: the real bot as a subprocess, the fake platforms in this process.

``BotProcess`` starts ``python -m tests.faults.fault_bot serve`` (the product with a scripted
model), waits for ``/healthz`` to say ``ok``, kills it (-9) or stops it (SIGTERM) and restarts it
on the same database. Its output goes to a file that every assertion message ends with.

A ``Transport`` (Slack over HTTP or Socket Mode, Discord mentions or ``/ask``) sends questions the
way the platform would, injects faults into its fake, and reads back what users see. ``check``
compares that with the database: per question exactly one bot message, whose text is the stored
answer; every question answered once, in the order it was asked within its conversation; no
placeholder left behind. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import text

from adapters.slack_reply import escape
from bot.events import ChannelRef
from storage.db import create_engine, normalize_url
from storage.repository import Storage, StoredTurn
from tests.adapters.discord import fake_discord
from tests.adapters.discord.fake_discord import BOT_ID, FakeDiscord, content_of, is_edit
from tests.adapters.slack import fake_slack
from tests.adapters.slack.fake_slack import (
    APP_TOKEN,
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
    event_body,
    mention,
    new_ts,
    sign,
)
from tests.faults.fault_bot import END_MARK

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 30.0
SLACK_PLACEHOLDER = fake_slack.PLACEHOLDER
DISCORD_PLACEHOLDER = "…"
TRANSPORTS = ("slack_http", "slack_socket", "discord_mention", "discord_ask")
_PLATFORM_PREFIXES = ("BOT_", "SLACK_", "DISCORD_", "FAULT_")
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def new_qid() -> str:
    return f"q{uuid.uuid4().hex[:10]}"


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]],
    timeout_s: float,
    *,
    interval_s: float = 0.05,
    abort: Callable[[], str | None] | None = None,
) -> bool:
    """Poll ``check`` until it is true (True) or ``timeout_s`` passes (False); ``abort`` may end the
    wait early by returning a reason (then False as well)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return True
        if time.monotonic() >= deadline or (abort is not None and abort() is not None):
            return False
        await asyncio.sleep(interval_s)


# --- the bot process -----------------------------------------------------------------------------


def base_env(workdir: Path) -> dict[str, str]:
    """The test process's environment without any bot, platform or proxy setting, plus what every
    fault bot needs (its own caches, the torch int4 path, this checkout on the import path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PLATFORM_PREFIXES) and k not in _PROXIES}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_CACHE_HOME"] = str(workdir / "xdg-cache")
    env["XDG_DATA_HOME"] = str(workdir / "xdg-data")
    env["BOT_DATA_DIR"] = str(workdir / "data")
    env["BOT_INT4_KERNEL"] = "torch"
    env["BOT_LOG_LEVEL"] = "INFO"
    env["BOT_HTTP_HOST"] = "127.0.0.1"
    return env


class BotProcess:
    """One bot, started and restarted as a real process on the same settings and database."""

    def __init__(self, env: Mapping[str, str], workdir: Path, port: int) -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.port = port
        self.log_path = workdir / "bot.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.expected_exit = False  # a kill or stop is under way: an exit is no failure

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def died(self) -> str | None:
        """Why the bot is gone when it should not be (for ``wait_until``'s abort), else None."""
        if self.proc is not None and not self.expected_exit and self.proc.poll() is not None:
            return f"the bot exited unexpectedly with status {self.proc.returncode}"
        return None

    async def start(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Start the bot and wait until /healthz says ok; returns the seconds that took."""
        started = time.monotonic()
        self.launch()
        assert self.proc is not None
        health: dict[str, Any] | None = None
        deadline = started + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"the bot exited with status {self.proc.returncode} before it was ready"
                        + self.log_tail()
                    )
                health = await self._health(http)
                if health is not None and health.get("status") == "ok":
                    return time.monotonic() - started
                await asyncio.sleep(0.1)
        raise AssertionError(
            f"the bot was not ready within {timeout_s} s (last /healthz: {health})" + self.log_tail()
        )

    def launch(self) -> None:
        """Start the bot without waiting for it to be ready."""
        assert not self.running, "the bot is already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.proc = self._spawn()
        self.expected_exit = False

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "tests.faults.fault_bot", "serve"],
                cwd=self.workdir,  # no .env from the checkout is read
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def _health(self, http: aiohttp.ClientSession) -> dict[str, Any] | None:
        try:
            async with http.get(f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                body = await response.json(content_type=None)
                return body if isinstance(body, dict) else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def health(self) -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as http:
            return await self._health(http)

    async def kill(self) -> None:
        """kill -9, and wait until it is gone."""
        assert self.proc is not None
        self.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.wait_exit(EXIT_TIMEOUT_S)

    def terminate(self) -> float:
        """Send SIGTERM; returns when it was sent (``time.monotonic``)."""
        assert self.proc is not None
        self.expected_exit = True
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        if not await wait_until(lambda: self.proc is not None and self.proc.poll() is not None, timeout_s):
            raise AssertionError(f"the bot did not exit within {timeout_s} s" + self.log_tail())
        return self.proc.returncode

    def close(self) -> None:
        """Teardown: kill whatever still runs."""
        if self.running and self.proc is not None:
            self.expected_exit = True
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_TIMEOUT_S)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return f"\n--- bot log ({self.log_path}), last {chars} characters ---\n{self.log_text()[-chars:]}"


# --- questions and conversations -------------------------------------------------------------------


@dataclass
class Conversation:
    index: int
    channel: str  # Slack channel id, or the Discord channel id as text
    root: str | None = None  # Slack: the thread (the first question's ts)
    questions: list[Question] = field(default_factory=list)


@dataclass
class Question:
    conversation: Conversation
    qid: str
    text: str  # as typed, without the bot's mention
    user: str
    sent_at: float = 0.0
    acked_at: float | None = None  # HTTP 200 / socket ack (Slack); Discord: see Transport.reacted_at
    ack_s: float | None = None  # the accepting request's round trip (Slack)
    attempts: int = 0
    slack_ts: str | None = None
    slack_event_id: str | None = None
    discord_id: int | None = None  # the user's message, or the interaction
    token: str | None = None  # a Discord interaction's token

    def __str__(self) -> str:
        return self.qid

    @property
    def event_id(self) -> str | None:
        """The id the bot records it under (Slack's event id; the Discord message or interaction id)."""
        if self.slack_event_id is not None:
            return self.slack_event_id
        return str(self.discord_id) if self.discord_id is not None else None


# --- transports -------------------------------------------------------------------------------------


class Transport(ABC):
    """How questions reach the bot and what its answers look like on one platform."""

    name: str
    platform: str
    placeholder: str

    def __init__(self) -> None:
        self.conversations: list[Conversation] = []

    @abstractmethod
    def env(self) -> dict[str, str]:
        """The bot's platform settings."""

    @abstractmethod
    def new_conversation(self) -> Conversation: ...

    @abstractmethod
    async def _send(self, question: Question) -> None:
        """Deliver one question; return once the platform considers it delivered."""

    @abstractmethod
    def messages(self, question: Question) -> list[str]:
        """The current text of every bot message that belongs to ``question``."""

    @abstractmethod
    def conversation_messages(self, conversation: Conversation) -> list[str]:
        """The current text of every bot message in the conversation."""

    @abstractmethod
    def channel_ref(self, conversation: Conversation) -> ChannelRef: ...

    @abstractmethod
    def edits(self, question: Question) -> list[tuple[float, float | None, str]]:
        """Every edit call of the question's (first) message: (start, end, text)."""

    @abstractmethod
    def max_edits_in_flight(self, question: Question) -> int: ...

    @abstractmethod
    def first_write_at(self, question: Question) -> float | None:
        """When the bot first showed anything for it (placeholder, deferral)."""

    @abstractmethod
    def edit_fault(
        self,
        conversation: Conversation | None,
        *,
        final_only: bool,
        delay_s: float = 0.0,
        hold: asyncio.Event | None = None,
        errors: Sequence[str] = (),
    ) -> Any:
        """Install a fault for the bot's edits (of the final, complete text only when
        ``final_only``): delayed, held (then cut off), or answered with ``errors`` ("500", "429")
        first. Returns the fake's fault (``seen`` counts the calls it caught)."""

    @abstractmethod
    def chaos(self, rate: float, seed: int) -> None:
        """Fail ``rate`` of the bot's writes at random with a 5xx or a 429."""

    async def ask(
        self, conversation: Conversation, text: str | None = None, *, user: str | None = None
    ) -> Question:
        qid = new_qid()
        question = Question(conversation, qid, f"{qid} {text or ''}".strip(), user or self.default_user())
        conversation.questions.append(question)
        question.sent_at = time.monotonic()
        await self._send(question)
        return question

    def default_user(self) -> str:
        return "U1"

    def reacted_at(self, question: Question) -> float | None:
        """When the platform (Slack) or the bot (Discord: its first reply or deferral) acknowledged it."""
        return question.acked_at

    def streamed(self, question: Question) -> bool:
        """Whether some partial answer text has been shown for it."""
        return any(
            text != self.placeholder and not text.endswith(END_MARK) for _, _, text in self.edits(question)
        )

    def is_placeholder(self, text: str) -> bool:
        return text.strip() in ("", self.placeholder)

    def shown(self, answer: str) -> str:
        """How a stored answer reads on the platform."""
        return answer


class SlackTransport(Transport):
    platform = "slack"
    placeholder = SLACK_PLACEHOLDER
    _channels = itertools.count(1)

    def __init__(self, fake: FakeSlack) -> None:
        super().__init__()
        self.fake = fake

    def env(self) -> dict[str, str]:
        return {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": self.fake.api_url}

    def new_conversation(self) -> Conversation:
        conversation = Conversation(len(self.conversations), f"C{next(self._channels):04d}")
        self.conversations.append(conversation)
        return conversation

    def event(self, question: Question) -> dict[str, Any]:
        conversation = question.conversation
        ts = new_ts()
        question.slack_ts = ts
        if conversation.root is None:
            conversation.root = ts
            event = mention(question.text, channel=conversation.channel, user=question.user, ts=ts)
        else:
            event = mention(
                question.text,
                channel=conversation.channel,
                user=question.user,
                ts=ts,
                thread_ts=conversation.root,
            )
        body = event_body(event)
        question.slack_event_id = str(body["event_id"])
        return body

    def channel_ref(self, conversation: Conversation) -> ChannelRef:
        return ChannelRef("slack", conversation.channel, conversation.root)

    def _thread(self, conversation: Conversation) -> list[fake_slack.Message]:
        return [m for m in self.fake.bot_messages(conversation.channel) if m.thread_ts == conversation.root]

    def conversation_messages(self, conversation: Conversation) -> list[str]:
        return [m.text for m in self._thread(conversation)]

    def _own(self, question: Question) -> list[fake_slack.Message]:
        return [m for m in self._thread(question.conversation) if question.qid in m.text]

    def messages(self, question: Question) -> list[str]:
        return [m.text for m in self._own(question)]

    def _first(self, question: Question) -> fake_slack.Message | None:
        own = self._own(question)
        return own[0] if own else None

    def edits(self, question: Question) -> list[tuple[float, float | None, str]]:
        first = self._first(question)
        if first is None:  # not yet past the placeholder: any edit in the thread so far
            return [
                (c.at, c.ended, str(c.params.get("text")))
                for c in self.fake.calls_to("chat.update")
                if c.params.get("channel") == question.conversation.channel
                and question.qid in str(c.params.get("text"))
            ]
        return [
            (c.at, c.ended, str(c.params.get("text")))
            for c in self.fake.calls_to("chat.update")
            if c.params.get("channel") == first.channel and c.params.get("ts") == first.ts
        ]

    def max_edits_in_flight(self, question: Question) -> int:
        first = self._first(question)
        return 0 if first is None else self.fake.max_updates_in_flight.get((first.channel, first.ts), 0)

    def first_write_at(self, question: Question) -> float | None:
        """When the first post into its thread after it was asked went out (its placeholder)."""
        conversation = question.conversation
        posts = [
            c.at
            for c in self.fake.calls_to("chat.postMessage")
            if c.params.get("channel") == conversation.channel
            and c.params.get("thread_ts") == conversation.root
            and c.at >= question.sent_at
        ]
        return min(posts) if posts else None

    def shown(self, answer: str) -> str:
        return escape(answer)

    def edit_fault(
        self,
        conversation: Conversation | None,
        *,
        final_only: bool,
        delay_s: float = 0.0,
        hold: asyncio.Event | None = None,
        errors: Sequence[str] = (),
    ) -> fake_slack.Fault:
        def when(params: dict[str, Any]) -> bool:
            if conversation is not None and params.get("channel") != conversation.channel:
                return False
            return not final_only or str(params.get("text", "")).endswith(END_MARK)

        answers = [
            fake_slack.rate_limited(1) if e == "429" else fake_slack.server_error(int(e)) for e in errors
        ]
        return self.fake.add_fault(
            fake_slack.Fault("chat.update", when, delay_s=delay_s, hold=hold, answers=answers)
        )

    def chaos(self, rate: float, seed: int) -> None:
        answers = [fake_slack.server_error(500), fake_slack.server_error(503), fake_slack.rate_limited(1)]
        for method in ("chat.postMessage", "chat.update"):
            self.fake.add_fault(
                fake_slack.Fault(method, answers=list(answers), probability=rate, rng=random.Random(seed))
            )


class SlackHttpTransport(SlackTransport):
    """Slack's Events API: signed POSTs to the bot's /slack/events, retried as Slack retries them
    (same event id, ``X-Slack-Retry-Num``) while the bot answers anything but 200 or is down."""

    name = "slack_http"

    def __init__(self, fake: FakeSlack, bot_url: Callable[[], str]) -> None:
        super().__init__(fake)
        self.bot_url = bot_url

    def env(self) -> dict[str, str]:
        return {**super().env(), "SLACK_SIGNING_SECRET": SIGNING_SECRET}

    async def post(self, body: Mapping[str, Any], *, retry: int = 0) -> tuple[int, dict[str, str], float]:
        """One signed POST: (status, headers, seconds); status 0 when nothing answered."""
        raw = json.dumps(body)
        headers = sign(raw)
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_error"}
        started = time.monotonic()
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{self.bot_url()}/slack/events",
                    data=raw,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as response,
            ):
                await response.read()
                return response.status, dict(response.headers), time.monotonic() - started
        except (aiohttp.ClientError, TimeoutError):
            return 0, {}, time.monotonic() - started

    async def _send(self, question: Question) -> None:
        body = self.event(question)
        await self.deliver(question, body)

    async def deliver(self, question: Question, body: Mapping[str, Any], *, first_retry: int = 0) -> None:
        deadline = time.monotonic() + SEND_TIMEOUT_S
        retry = first_retry
        while True:
            question.attempts += 1
            status, headers, seconds = await self.post(body, retry=retry)
            if status == 200:
                question.acked_at, question.ack_s = time.monotonic(), seconds
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"Slack could not deliver {question.qid}: the last answer was {status}")
            retry += 1
            wait = 0.2
            with contextlib.suppress(ValueError):
                wait = min(float(headers.get("Retry-After", wait)), 2.0)
            await asyncio.sleep(wait)


class SlackSocketTransport(SlackTransport):
    """Socket Mode: envelopes over the fake's websocket, sent again (``retry_attempt``) when no ack
    came within 3 s (the bot died or reconnected), as Slack does."""

    name = "slack_socket"
    ACK_WAIT_S = 3.0

    def env(self) -> dict[str, str]:
        return {**super().env(), "SLACK_APP_TOKEN": APP_TOKEN}

    async def _send(self, question: Question) -> None:
        body = self.event(question)
        deadline = time.monotonic() + SEND_TIMEOUT_S
        attempt = 0
        while True:
            question.attempts += 1
            try:
                envelope_id, sent = await self.fake.send_envelope(body, retry_attempt=attempt)
                acked = await self.fake.wait_ack(envelope_id, self.ACK_WAIT_S)
            except (TimeoutError, ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"Slack could not deliver {question.qid} over Socket Mode") from None
                attempt += 1
                await asyncio.sleep(0.1)
                continue
            question.acked_at, question.ack_s = acked, acked - sent
            return


class DiscordTransport(Transport):
    platform = "discord"
    placeholder = DISCORD_PLACEHOLDER

    def __init__(self, fake: FakeDiscord) -> None:
        super().__init__()
        self.fake = fake

    def env(self) -> dict[str, str]:
        return {
            "DISCORD_BOT_TOKEN": self.fake.token,
            "DISCORD_API_URL": self.fake.api_url,
            "DISCORD_GATEWAY_URL": self.fake.gateway_url,
        }

    def default_user(self) -> str:
        return "1001"

    def new_conversation(self) -> Conversation:
        conversation = Conversation(len(self.conversations), str(self.fake.add_channel()))
        self.conversations.append(conversation)
        return conversation

    def channel_ref(self, conversation: Conversation) -> ChannelRef:
        return ChannelRef("discord", conversation.channel)

    async def _wait_connected(self) -> None:
        # Gateway events sent while no client is connected are never delivered (as on Discord).
        if not await wait_until(lambda: self.fake.connected, SEND_TIMEOUT_S):
            raise AssertionError("no Discord gateway connection to send the question over")

    def conversation_messages(self, conversation: Conversation) -> list[str]:
        return [p.content for p in self.fake.bot_messages(int(conversation.channel))]

    @abstractmethod
    def _own(self, question: Question) -> list[fake_discord.Posted]: ...

    def messages(self, question: Question) -> list[str]:
        return [p.content for p in self._own(question)]

    @abstractmethod
    def _edit_path(self, question: Question) -> str | None: ...

    def edits(self, question: Question) -> list[tuple[float, float | None, str]]:
        path = self._edit_path(question)
        return [
            (c.at, c.ended, content_of(c) or "")
            for c in self.fake.calls
            if path is not None and is_edit(c) and c.path == path
        ]

    def max_edits_in_flight(self, question: Question) -> int:
        path = self._edit_path(question)
        return 0 if path is None else self.fake.max_edits_in_flight.get(path, 0)

    def edit_fault(
        self,
        conversation: Conversation | None,
        *,
        final_only: bool,
        delay_s: float = 0.0,
        hold: asyncio.Event | None = None,
        errors: Sequence[str] = (),
    ) -> fake_discord.Fault:
        channel = conversation.channel if conversation is not None else None

        def when(call: fake_discord.Call) -> bool:
            if not is_edit(call):
                return False
            if channel is not None and not self._in_channel(call, channel):
                return False
            return not final_only or (content_of(call) or "").endswith(END_MARK)

        answers = [
            fake_discord.rate_limited(1.0) if e == "429" else fake_discord.server_error(int(e))
            for e in errors
        ]
        return self.fake.add_fault(fake_discord.Fault(when, delay_s=delay_s, hold=hold, answers=answers))

    def _in_channel(self, call: fake_discord.Call, channel: str) -> bool:
        if call.path.startswith(f"/channels/{channel}/"):
            return True
        parts = call.path.strip("/").split("/")
        if len(parts) >= 3 and parts[0] == "webhooks":
            interaction = self.fake.interactions.get(parts[2])
            return interaction is not None and str(interaction.channel_id) == channel
        return False

    def chaos(self, rate: float, seed: int) -> None:
        def writes(call: fake_discord.Call) -> bool:
            return call.method in ("POST", "PATCH") and (
                call.path.startswith("/channels/") or call.path.startswith("/webhooks/")
            )

        answers = [
            fake_discord.server_error(500),
            fake_discord.server_error(502),
            fake_discord.rate_limited(0.5),
        ]
        self.fake.add_fault(
            fake_discord.Fault(writes, answers=answers, probability=rate, rng=random.Random(seed))
        )


class DiscordMentionTransport(DiscordTransport):
    """A guild message that mentions the bot; the answer is a reply to it."""

    name = "discord_mention"

    async def _send(self, question: Question) -> None:
        await self._wait_connected()
        question.attempts += 1
        question.sent_at = time.monotonic()
        question.discord_id = await self.fake.user_message(
            int(question.conversation.channel),
            f"<@{BOT_ID}> {question.text}",
            user_id=int(question.user),
            mentions=(BOT_ID,),
        )

    def _own(self, question: Question) -> list[fake_discord.Posted]:
        assert question.discord_id is not None
        replies = self.fake.replies_to(question.discord_id)
        others = [
            p
            for p in self.fake.bot_messages(int(question.conversation.channel))
            if p.reference != question.discord_id and question.qid in p.content
        ]
        return sorted([*replies, *others], key=lambda p: p.id)

    def _edit_path(self, question: Question) -> str | None:
        own = self._own(question)
        return f"/channels/{question.conversation.channel}/messages/{own[0].id}" if own else None

    def reacted_at(self, question: Question) -> float | None:
        for call in self.fake.calls:
            body = call.body if isinstance(call.body, dict) else {}
            reference = (body.get("message_reference") or {}).get("message_id")
            if call.method == "POST" and reference is not None and int(reference) == question.discord_id:
                return call.at
        return None

    def first_write_at(self, question: Question) -> float | None:
        return self.reacted_at(question)


class DiscordAskTransport(DiscordTransport):
    """``/ask prompt:...``: deferred, then answered through the interaction's token (or, once the
    token has expired, in a channel message that quotes the question)."""

    name = "discord_ask"

    def __init__(self, fake: FakeDiscord, *, age_s: float = 0.0) -> None:
        super().__init__(fake)
        self.age_s = age_s  # how old the interactions' ids say they are

    async def _send(self, question: Question) -> None:
        await self._wait_connected()
        question.attempts += 1
        question.sent_at = time.monotonic()
        interaction = await self.fake.slash_command(
            "ask",
            int(question.conversation.channel),
            user_id=int(question.user),
            options={"prompt": question.text},
            age_s=self.age_s,
        )
        question.discord_id, question.token = interaction.id, interaction.token

    def _own(self, question: Question) -> list[fake_discord.Posted]:
        assert question.token is not None
        own = [p for p in self.fake.posted.values() if p.token == question.token and not p.deleted]
        others = [
            p
            for p in self.fake.bot_messages(int(question.conversation.channel))
            if p.token != question.token and question.qid in p.content
        ]
        return sorted([*own, *others], key=lambda p: p.id)

    def _edit_path(self, question: Question) -> str | None:
        if question.token is None:
            return None
        prefix = f"/webhooks/{fake_discord.APP_ID}/{question.token}/messages/@original"
        return prefix

    def reacted_at(self, question: Question) -> float | None:
        for call in self.fake.calls:
            if call.method == "POST" and call.path.endswith(f"/{question.token}/callback"):
                return call.at
        return None

    def first_write_at(self, question: Question) -> float | None:
        return self.reacted_at(question)


# --- the database -------------------------------------------------------------------------------


class Database:
    """Reads what the bot stored, through the product's own Storage (and plain SQL for events)."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self._storage: Storage | None = None

    async def storage(self) -> Storage:
        if self._storage is None:
            self._storage = await Storage.open(
                self.url, instance_id="fault-test-reader", data_dir=self.data_dir
            )
        return self._storage

    async def turns(self, channel: ChannelRef) -> list[StoredTurn]:
        return await (await self.storage()).recent_turns(channel, 10_000)

    async def event_statuses(self) -> dict[str, str]:
        """event id -> status of every recorded platform event."""
        engine = create_engine(normalize_url(self.url, self.data_dir))
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(text("SELECT event_id, status FROM processed_events"))
                return {str(event_id): str(status) for event_id, status in rows}
        finally:
            await engine.dispose()

    async def close(self) -> None:
        if self._storage is not None:
            await self._storage.close()
            self._storage = None


# --- a scenario's world ---------------------------------------------------------------------------


@dataclass
class Rig:
    """One scenario's world: a transport on its fake, the bot process, the database."""

    transport: Transport
    bot: BotProcess
    db: Database
    slack: FakeSlack | None
    discord: FakeDiscord | None


async def wait_streamed(rig: Rig, question: Question, timeout_s: float = 15.0) -> None:
    """Wait (bounded; asserted) until some partial answer text is shown for ``question``."""
    streamed = await wait_until(lambda: rig.transport.streamed(question), timeout_s, abort=rig.bot.died)
    assert streamed, (
        f"no partial answer was shown for {question.qid} within {timeout_s} s" + rig.bot.log_tail()
    )


async def wait_recorded(rig: Rig, questions: Sequence[Question], timeout_s: float = 5.0) -> bool:
    """Whether the bot recorded these events in the database within ``timeout_s`` (not asserted:
    a fair moment to kill it)."""

    async def recorded() -> bool:
        statuses = await rig.db.event_statuses()
        return all(q.event_id in statuses for q in questions)

    return await wait_until(recorded, timeout_s, interval_s=0.1)


# --- the checks -------------------------------------------------------------------------------------


@dataclass
class Report:
    """What users see against what the database holds, per question."""

    questions: int = 0
    answered_once: int = 0
    duplicates: int = 0  # questions with more than one answer message or stored answer
    lost: int = 0  # questions with no stored answer or no message showing it
    wrong_text: int = 0  # one message, one stored answer, but the message does not show it
    dangling_placeholders: int = 0
    out_of_order: int = 0  # conversations whose stored order differs from the order asked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def check(
    transport: Transport,
    database: Database,
    conversations: Iterable[Conversation] | None = None,
    *,
    extra_messages_ok: bool = False,
) -> Report:
    """Compare every question of ``conversations`` (default: all) with the database.

    ``extra_messages_ok``: other bot messages in a conversation (a deferred response that can no
    longer be edited) are not a problem by themselves."""
    report = Report()
    for conversation in conversations if conversations is not None else transport.conversations:
        if not conversation.questions:
            continue
        turns = await database.turns(transport.channel_ref(conversation))
        stored_order: list[str] = []
        for question in conversation.questions:
            report.questions += 1
            stored = [turn for turn in turns if question.qid in turn.user]
            shown = transport.messages(question)
            stored_order += [question.qid] * len(stored)
            if len(stored) > 1 or len(shown) > 1:
                report.duplicates += 1
                report.problems.append(
                    f"{question.qid} ({transport.name}): {len(stored)} stored answers and {len(shown)} bot "
                    f"messages, expected one of each; messages: {shown!r}"
                )
            elif not stored or not shown:
                report.lost += 1
                report.problems.append(
                    f"{question.qid} ({transport.name}): not answered: {len(stored)} stored answers, bot "
                    f"messages {shown!r}"
                )
            elif shown[0] != transport.shown(stored[0].assistant):
                report.wrong_text += 1
                report.problems.append(
                    f"{question.qid} ({transport.name}): the message shows {shown[0]!r}, "
                    f"the stored answer is {stored[0].assistant!r}"
                )
            else:
                report.answered_once += 1
        asked = [q.qid for q in conversation.questions]
        kept = [qid for qid in stored_order if qid in asked]
        in_storage = sorted(set(kept), key=lambda qid: next(i for i, t in enumerate(turns) if qid in t.user))
        expected = [qid for qid in asked if qid in in_storage]
        if in_storage != expected:
            report.out_of_order += 1
            report.problems.append(
                f"conversation {conversation.channel} ({transport.name}): answers stored in the order "
                f"{in_storage}, the questions were asked in the order {expected}"
            )
        everything = transport.conversation_messages(conversation)
        placeholders = [m for m in everything if transport.is_placeholder(m)]
        if placeholders:
            report.dangling_placeholders += len(placeholders)
            report.problems.append(
                f"conversation {conversation.channel} ({transport.name}): {len(placeholders)} placeholder(s) "
                "left showing"
            )
        notes = [m for m in everything if any(mark in m for mark in ("may be missing", ":warning:", "⚠️"))]
        if notes:
            report.problems.append(
                f"conversation {conversation.channel} ({transport.name}): notes shown: {notes!r}"
            )
        if not extra_messages_ok and len(everything) - len(placeholders) > len(conversation.questions):
            report.problems.append(
                f"conversation {conversation.channel} ({transport.name}): {len(everything)} bot messages for "
                f"{len(conversation.questions)} questions: {everything!r}"
            )
    return report


async def settled(
    transport: Transport, database: Database, conversations: Iterable[Conversation] | None = None
) -> bool:
    """Whether every question shows its stored answer and nothing shows a placeholder."""
    for conversation in conversations if conversations is not None else transport.conversations:
        if not conversation.questions:
            continue
        turns = await database.turns(transport.channel_ref(conversation))
        for question in conversation.questions:
            stored = [turn for turn in turns if question.qid in turn.user]
            if len(stored) != 1 or transport.shown(stored[0].assistant) not in transport.messages(question):
                return False
        if any(transport.is_placeholder(m) for m in transport.conversation_messages(conversation)):
            return False
    return True


async def wait_settled(
    transport: Transport,
    database: Database,
    bot: BotProcess | None,
    *,
    timeout_s: float = 20.0,
    quiet_s: float = 0.7,
    conversations: Sequence[Conversation] | None = None,
) -> bool:
    """Wait (bounded) until ``settled``, then ``quiet_s`` more for anything posted late (a
    duplicate); returns whether it settled. Ends early if the bot died unexpectedly."""
    done = await wait_until(
        lambda: settled(transport, database, conversations),
        timeout_s,
        interval_s=0.1,
        abort=bot.died if bot is not None else None,
    )
    await asyncio.sleep(quiet_s)
    return done


def failure(report: Report, bot: BotProcess | None, what: str = "") -> str:
    lines = "\n".join(f"  - {problem}" for problem in report.problems)
    head = f"{what}: " if what else ""
    return f"{head}{len(report.problems)} problem(s):\n{lines}" + (bot.log_tail() if bot is not None else "")


def assert_delivered(report: Report, bot: BotProcess | None, what: str = "") -> None:
    assert report.ok, failure(report, bot, what)
