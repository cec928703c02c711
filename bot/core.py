"""The conversation flow: dedupe -> command -> history -> generate -> stream -> persist."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from bot import metrics
from bot.config import DeniedMode, Settings
from bot.events import (
    Adapter,
    ChannelRef,
    Command,
    IncomingMessage,
    Outcome,
    ReplyHandle,
    message_from_dict,
    message_to_dict,
    read_command,
)
from bot.generation import GenerationParams, GenerationRequest, Turn
from bot.sanitize import clean_text
from bot.service import ChatService, ServiceError
from storage.repository import ClaimResult, EventStatus, Storage

log = logging.getLogger(__name__)

HELP_TEXT = (
    "I'm a chat assistant running a local ChatGLM2-6B model. Ask me anything; I remember this "
    "conversation (this channel, thread or DM) until it is reset.\n"
    "Commands:\n"
    "• reset: forget this conversation's history\n"
    "• help: show this message"
)
EMPTY_TEXT = "Your message was empty. " + HELP_TEXT
RESET_TEXT = "Done: I've forgotten this conversation. The next message starts fresh."
REFUSAL_TEXT = "Sorry, I'm not enabled for you or for this channel."
RESET_REFUSAL = "Sorry, only members with the Manage Messages permission can reset this conversation."
FAILURE_TEXT = "Sorry, something went wrong while answering; please try again."
EMPTY_ANSWER_TEXT = "(The model produced no answer.)"

# Turns loaded from storage before trimming to the token budget: far more than ever fit in the
# context, so the budget (not this number) decides.
MAX_HISTORY_TURNS = 500


@dataclass
class _Progress:
    """Whether the event's final status is stored; after that a cancellation changes nothing."""

    settled: bool = False


class _ChannelLocks:
    """One FIFO lock per conversation, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[ChannelRef, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, channel: ChannelRef) -> AsyncIterator[None]:
        lock, users = self._locks.get(channel, (asyncio.Lock(), 0))
        self._locks[channel] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[channel]
            if users == 1:
                del self._locks[channel]
            else:
                self._locks[channel] = (lock, users - 1)


class Bot:
    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        service: ChatService,
        clock: Callable[[], float] = time.monotonic,  # throttles streamed updates; tests pass a fake
    ) -> None:
        self._clock = clock
        self._settings = settings
        self._storage = storage
        self._service = service
        self._locks = _ChannelLocks()
        self._recovering: set[asyncio.Task[Outcome]] = set()

    async def handle(self, message: IncomingMessage, reply: ReplyHandle) -> Outcome:
        """Answer one message; never raises (except cancellation), always says what it did."""
        try:
            outcome = await self._handle(message, reply)
        except asyncio.CancelledError:
            metrics.MESSAGES.labels(message.channel.platform, "cancelled").inc()
            raise
        except Exception:
            log.exception("failed to handle %s event %s", message.channel, message.event_id)
            await self._safe_fail(reply, FAILURE_TEXT)
            outcome = Outcome.FAILED
        metrics.MESSAGES.labels(message.channel.platform, outcome.value).inc()
        return outcome

    async def recover(self, adapters: Mapping[str, Adapter]) -> int:
        """Answer events a previous process recorded but never answered (it crashed or was killed)."""
        since = datetime.now(UTC) - timedelta(seconds=self._settings.recover_window_s)
        started = 0
        for payload in await self._storage.unanswered_events(since):
            try:
                message = message_from_dict(payload)
            except (KeyError, TypeError, ValueError):
                log.warning("skipping an unreadable stored event")
                continue
            adapter = adapters.get(message.channel.platform)
            reply = adapter.reply_for(message) if adapter is not None else None
            if reply is None:
                continue
            task = asyncio.create_task(self.handle(message, reply))
            self._recovering.add(task)
            task.add_done_callback(self._recovering.discard)
            started += 1
        if started:
            log.info("answering %d message(s) left unanswered by a previous run", started)
        return started

    # -- the flow --------------------------------------------------------------------------
    async def _handle(self, message: IncomingMessage, reply: ReplyHandle) -> Outcome:
        message = replace(message, text=clean_text(message.text))
        if not self._allowed(message):
            if self._settings.access_denied_mode is DeniedMode.SILENT:
                return Outcome.IGNORED
            await reply.begin()
            await reply.finish(REFUSAL_TEXT)
            return Outcome.REFUSED

        # Held from before the dedupe claim so one conversation is answered in arrival order.
        async with self._locks.hold(message.channel):
            if message.followup_only and not await self._storage.has_history(message.channel):
                return Outcome.IGNORED
            platform, event_id = message.channel.platform, message.event_id
            claim = await self._storage.claim_event(platform, event_id, message_to_dict(message))
            if claim is ClaimResult.DUPLICATE:
                log.info("duplicate %s event %s dropped", platform, event_id)
                return Outcome.DUPLICATE
            progress = _Progress()
            try:
                return await self._answer(message, reply, progress)
            except asyncio.CancelledError:
                if not progress.settled:  # an answer already stored stays answered
                    await self._storage.mark_event(platform, event_id, EventStatus.FAILED)
                    await self._safe_fail(reply, "The answer was cancelled.")
                raise
            except Exception:
                if not progress.settled:
                    await self._storage.mark_event(platform, event_id, EventStatus.FAILED)
                raise

    async def _answer(self, message: IncomingMessage, reply: ReplyHandle, progress: _Progress) -> Outcome:
        channel, text = message.channel, message.text
        command = message.command or read_command(text)
        if command is Command.CHAT and not text:
            return await self._reply_text(message, reply, EMPTY_TEXT, Outcome.REJECTED, progress)
        if command is Command.HELP:
            return await self._reply_text(message, reply, HELP_TEXT, Outcome.COMMAND, progress)
        if command is Command.RESET and not message.may_reset:
            return await self._reply_text(message, reply, RESET_REFUSAL, Outcome.REFUSED, progress)
        if command is Command.RESET:
            await self._storage.clear(channel)
            return await self._reply_text(message, reply, RESET_TEXT, Outcome.COMMAND, progress)

        limit = self._settings.max_message_chars
        if len(text) > limit:
            note = (
                f"Your message is {len(text):,} characters long; the limit is {limit:,}. Please shorten it."
            )
            return await self._reply_text(message, reply, note, Outcome.REJECTED, progress)

        budget = self._token_budget()
        if self._service.prompt_tokens(text, ()) > budget:
            note = (
                f"Your message is too long for the model's context ({budget:,} tokens are available "
                "for the prompt). Please shorten it."
            )
            return await self._reply_text(message, reply, note, Outcome.REJECTED, progress)

        history = await self._history(channel, text, budget)
        started = time.monotonic()
        await reply.begin()
        answer = await self._generate(message, history, reply)
        if answer is None:
            progress.settled = True
            return Outcome.FAILED
        await self._storage.append_turn(
            channel,
            author_id=message.author_id,
            author_name=message.author_name,
            user_text=text,
            user_tokens=self._service.count_tokens(text),
            assistant_text=answer,
            assistant_tokens=self._service.count_tokens(answer),
            event=(channel.platform, message.event_id),
        )
        progress.settled = True
        await reply.finish(answer or EMPTY_ANSWER_TEXT)
        # One line per answer for operators: where, how much, how long; never the words.
        log.info(
            "answered %s: %d history turns, %d answer tokens, %.1f s",
            channel,
            len(history),
            self._service.count_tokens(answer),
            time.monotonic() - started,
        )
        return Outcome.ANSWERED

    async def _generate(
        self, message: IncomingMessage, history: tuple[Turn, ...], reply: ReplyHandle
    ) -> str | None:
        """Stream the answer into ``reply``; None (the user told why) when it did not complete."""
        settings = self._settings
        request = GenerationRequest(
            query=message.text,
            history=history,
            params=GenerationParams(
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
            ),
            conversation=str(message.channel),
        )
        parts: list[str] = []
        try:
            stream = self._service.stream(request)
            last_update = self._clock()
            sent = ""
            async for delta in stream:
                parts.append(delta)
                now = self._clock()
                if now - last_update >= settings.stream_interval:
                    partial = "".join(parts)
                    if partial.strip() and partial != sent:
                        await reply.update(partial)
                        sent, last_update = partial, now
        except ServiceError as exc:
            await self._storage.mark_event(message.channel.platform, message.event_id, EventStatus.FAILED)
            await self._safe_fail(reply, str(exc))
            return None
        assert stream.result is not None
        return stream.result.text

    async def _history(self, channel: ChannelRef, query: str, budget: int) -> tuple[Turn, ...]:
        """The newest turns whose full prompt, with ``query``, fits in ``budget`` tokens."""
        stored = await self._storage.recent_turns(channel, MAX_HISTORY_TURNS)
        turns = [(turn.user, turn.assistant) for turn in stored]
        # The prompt grows with every turn kept, so binary-search the longest fitting suffix.
        low, high = 0, len(turns)
        while low < high:
            mid = (low + high + 1) // 2
            if self._service.prompt_tokens(query, turns[-mid:]) <= budget:
                low = mid
            else:
                high = mid - 1
        return tuple(turns[len(turns) - low :])

    def _token_budget(self) -> int:
        context = min(self._settings.max_context_tokens, self._service.max_context_tokens)
        return context - self._settings.max_new_tokens

    def _allowed(self, message: IncomingMessage) -> bool:
        users, channels = self._settings.allowlists(message.channel.platform)
        if users and message.author_id not in users:
            return False
        return not channels or message.channel.channel_id in channels

    async def _reply_text(
        self,
        message: IncomingMessage,
        reply: ReplyHandle,
        text: str,
        outcome: Outcome,
        progress: _Progress,
    ) -> Outcome:
        await self._storage.mark_event(message.channel.platform, message.event_id, EventStatus.ANSWERED)
        progress.settled = True
        await reply.begin()
        await reply.finish(text)
        return outcome

    @staticmethod
    async def _safe_fail(reply: ReplyHandle, reason: str) -> None:
        try:
            await reply.fail(reason)
        except Exception:
            log.exception("could not deliver a failure note")
