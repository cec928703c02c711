"""The conversation flow: record -> wait for the conversation's turn -> command or generate ->
stream -> store the turn with the final text (the outbox) -> deliver until the platform confirms.

Every accepted message is recorded before anything else can happen to it (``submit``), in arrival
order, so a crash at any later moment leaves a row that the next start (or another replica, once
this one's lease has run out) finishes in the same platform message. See storage.models.ProcessedEvent
for the states.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from bot import metrics
from bot.config import DeniedMode, Settings
from bot.events import (
    Adapter,
    ChannelRef,
    Command,
    DeliveryError,
    IncomingMessage,
    Outcome,
    ReplyHandle,
    message_from_dict,
    message_to_dict,
    read_command,
)
from bot.generation import GenerationParams, GenerationRequest, Turn
from bot.sanitize import clean_user_text
from bot.service import ChatService, ServiceError
from bot.store import NOT_ANSWERED, ClaimResult, EventStatus, FinalKind, LostClaim, Store, StoredEvent

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
CANCELLED_TEXT = "The answer was cancelled."

# Turns loaded from storage before trimming to the token budget: far more than ever fit in the
# context, so the budget (not this number) decides.
MAX_HISTORY_TURNS = 500
# Delivery of a final text: attempts, with exponential backoff from 2 s capped at 60 s (about four
# minutes in all) unless the platform says when (Retry-After).
DELIVERY_ATTEMPTS = 8
DELIVERY_FIRST_RETRY_S = 2.0
DELIVERY_MAX_RETRY_S = 60.0
TURN_POLL_S = 0.5  # how often a message waits on an earlier one that another replica holds
RESOLVE_TIMEOUT_S = 10.0  # name look-ups after this are skipped: ids stay ids


@dataclass(eq=False)
class _Work:
    """One event being answered (or delivered) by this process."""

    event: StoredEvent
    message: IncomingMessage
    reply: ReplyHandle
    accept: bool  # the reply's accept() is still to run (a fresh message, not a recovered one)
    task: asyncio.Task[Outcome] | None = None
    # Set once this event no longer holds its conversation's later messages back.
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    saved_handle: dict[str, Any] | None = None
    final: tuple[str, FinalKind] | None = None
    next_write_at: float = 0.0  # on the core's clock: the final text, too, keeps the edit spacing
    connection: int = 0  # which attach() of its platform's adapter the reply was made by


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


class _EditPacer:
    """Streams partial text into a reply: at most one edit in flight, each carrying the newest text
    and sent no sooner than ``interval`` after the previous one ended, so a slow or rate-limited
    platform gets fewer edits, never a queue of them."""

    def __init__(
        self,
        reply: ReplyHandle,
        interval: float,
        clock: Callable[[], float],
        on_written: Callable[[], Awaitable[None]],
    ) -> None:
        self._reply = reply
        self._interval = interval
        self._clock = clock
        self._on_written = on_written
        self._latest = ""
        self._sent = ""
        self._changed = asyncio.Event()
        self._last_end = clock()  # the placeholder was just written
        self._writing: asyncio.Future[None] | None = None
        self._task = asyncio.create_task(self._run())

    def offer(self, text: str) -> None:
        if text.strip():
            self._latest = text
            self._changed.set()

    @property
    def next_write_at(self) -> float:
        """When the next write (the final text) may start: the interval after the last edit ended
        (at once if no edit was sent)."""
        return self._last_end + self._interval if self._sent else -float("inf")

    async def close(self) -> None:
        """Stop; an edit in flight is let finish first, so the final text never races it."""
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        if self._writing is not None:
            await self._writing

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            wait = self._interval - (self._clock() - self._last_end)
            if wait > 0:
                await asyncio.sleep(wait)
            self._changed.clear()
            text = self._latest
            if text == self._sent:
                continue
            # Shielded: cancelling the pacer must not cut an edit off half-way; close() awaits it.
            self._writing = asyncio.ensure_future(self._write(text))
            await asyncio.shield(self._writing)

    async def _write(self, text: str) -> None:
        try:
            await self._reply.update(text)
            await self._on_written()
        except Exception:  # a missed edit is harmless: the next one, or the final text, shows it all
            log.warning("a streamed edit failed", exc_info=True)
        self._sent, self._last_end = text, self._clock()


class Bot:
    def __init__(
        self,
        settings: Settings,
        storage: Store,
        service: ChatService,
        clock: Callable[[], float] = time.monotonic,  # paces streamed edits; tests pass a fake
    ) -> None:
        self._clock = clock
        self._settings = settings
        self._storage = storage
        self._service = service
        self._adapters: dict[str, Adapter] = {}
        self._connections: dict[str, int] = {}  # platform -> how many times an adapter was attached
        self._record_locks = _ChannelLocks()
        self._work: dict[int, _Work] = {}  # event row id -> its work
        self._by_key: dict[tuple[str, str], int] = {}  # (platform, event_id) -> event row id
        self._draining = False  # new messages are recorded, not started (the next start answers them)
        self._stopping = False  # cancelled work stays resumable instead of being given up
        self._maintenance: asyncio.Task[None] | None = None

    # -- the adapters' seam ------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False once shutting down: an adapter that can make the platform redeliver later (Slack
        over HTTP: 503 + Retry-After) should, rather than hand in new messages."""
        return not self._draining

    def attach(self, adapter: Adapter) -> None:
        """Make ``adapter`` the one that answers (and resumes) its platform's events. Attached
        again after a reconnect, replies made on the old connection are rebuilt from their stored
        handles before their delivery is retried."""
        self._adapters[adapter.platform] = adapter
        self._connections[adapter.platform] = self._connections.get(adapter.platform, 0) + 1

    async def submit(self, message: IncomingMessage, reply: ReplyHandle) -> Outcome:
        """Record ``message`` (before any other await) and answer it in the background."""
        platform, event_id = message.channel.platform, message.event_id
        payload = message_to_dict(message)
        # FIFO per conversation: concurrent submits are recorded in the order they were called.
        async with self._record_locks.hold(message.channel):
            claim = await self._storage.record_event(platform, event_id, str(message.channel), payload)
        if claim.result is ClaimResult.DUPLICATE or claim.event is None:
            log.info("duplicate %s event %s dropped", platform, event_id)
            metrics.MESSAGES.labels(platform, Outcome.DUPLICATE.value).inc()
            return Outcome.DUPLICATE
        event = claim.event
        if claim.result is ClaimResult.TAKEOVER and event.reply_handle is not None:
            # A redelivery of an answer a dead process had started: finish it where it is shown.
            reply = self._reply_for(message, event.reply_handle) or reply
        if self._draining:
            await self._accept_only(_Work(event, message, reply, accept=False))
            return Outcome.DEFERRED
        self._start(_Work(event, message, reply, accept=True))
        return Outcome.ACCEPTED

    async def handle(self, message: IncomingMessage, reply: ReplyHandle) -> Outcome:
        """``submit`` and wait for the answer; cancelling the wait cancels the answer."""
        outcome = await self.submit(message, reply)
        work = self._work.get(self._by_key.get((message.channel.platform, message.event_id), -1))
        if outcome is not Outcome.ACCEPTED or work is None or work.task is None:
            return outcome
        try:
            return await asyncio.shield(work.task)
        except asyncio.CancelledError:
            work.task.cancel()
            with suppress(asyncio.CancelledError):  # let it settle before the caller goes on
                await work.task
            raise

    def cancel(self, platform: str, event_id: str) -> bool:
        work = self._work.get(self._by_key.get((platform, event_id), -1))
        if work is None or work.task is None or work.task.done():
            return False
        work.task.cancel()
        return True

    async def remembered_turns(self, channel: ChannelRef) -> int:
        return len(await self._storage.recent_turns(channel, MAX_HISTORY_TURNS))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        """Resume what earlier runs left unfinished, then keep leases alive and sweep for the
        events of dead replicas in the background; returns how many events were resumed."""
        await self._storage.expire_events(self._window_start())
        resumed = await self.recover()
        if self._maintenance is None:
            self._maintenance = asyncio.create_task(self._maintain(), name="delivery-maintenance")
        return resumed

    async def recover(self) -> int:
        """Take over and finish every unfinished event whose owner is gone (a crashed or stopped
        earlier run of this replica, or a dead replica), in arrival order per conversation."""
        since = self._window_start()
        started = 0
        for orphan in await self._storage.orphaned_events(since):
            if orphan.id in self._work:
                continue
            try:
                message = message_from_dict(orphan.payload)
            except (KeyError, TypeError, ValueError):
                log.warning("skipping an unreadable stored %s event", orphan.platform)
                continue
            if message.channel.platform not in self._adapters:
                continue  # its platform is not connected (yet); a later sweep takes it
            reply = self._reply_for(message, orphan.reply_handle)
            taken = await self._storage.take_over(orphan)
            if taken is None:
                continue  # another replica was quicker
            if reply is None:
                await self._storage.set_status(taken, EventStatus.FAILED, error="cannot be answered any more")
                continue
            self._start(_Work(taken, message, reply, accept=False, saved_handle=taken.reply_handle))
            started += 1
        if started:
            log.info("resuming %d message(s) left unfinished by an earlier run", started)
        return started

    async def drain(self, grace_s: float) -> None:
        """Shut down: record but start nothing new, let the work in flight finish for up to
        ``grace_s`` seconds, then stop the rest where it stands (resumable, never failed) and
        release this process's leases so the next start, or another replica, takes over at once."""
        self._draining = True
        tasks = [work.task for work in self._work.values() if work.task is not None]
        if tasks:
            log.info("shutting down: letting %d answer(s) finish (up to %g s)", len(tasks), grace_s)
            await asyncio.wait(tasks, timeout=grace_s)
        self._stopping = True
        late: list[asyncio.Task[Any]] = [
            work.task for work in self._work.values() if work.task is not None and not work.task.done()
        ]
        for task in late:
            task.cancel()
        if self._maintenance is not None:
            self._maintenance.cancel()
            late.append(self._maintenance)
        await asyncio.gather(*late, return_exceptions=True)
        self._maintenance = None
        released = await self._storage.release_leases()
        if released:
            log.info("%d unfinished message(s) left for the next start", released)

    # -- one event's work ----------------------------------------------------------------------

    def _start(self, work: _Work) -> None:
        work.connection = self._connections.get(work.event.platform, 0)
        self._work[work.event.id] = work
        self._by_key[(work.event.platform, work.event.event_id)] = work.event.id
        work.task = asyncio.create_task(self._run(work), name=f"answer-{work.event.platform}-{work.event.id}")

    async def _run(self, work: _Work) -> Outcome:
        platform = work.event.platform
        outcome = Outcome.FAILED
        try:
            if work.accept:
                await work.reply.accept()
                await self._save_handle(work)
            if work.event.status in NOT_ANSWERED:
                await self._wait_turn(work)
                outcome = await self._answer(work)
            else:  # answered before a restart: only the delivery is left
                outcome = Outcome.ANSWERED
                work.final = (work.event.final_text or "", FinalKind(work.event.final_kind or FinalKind.TEXT))
            work.answered.set()
            if work.final is not None:
                await self._deliver(work)
            return outcome
        except asyncio.CancelledError:
            outcome = Outcome.DEFERRED if self._stopping else Outcome.FAILED
            if not self._stopping:  # the question was deleted, or its asker gave up waiting
                await self._storage.set_status(work.event, EventStatus.SKIPPED, error="cancelled")
                if work.final is None:  # a stored answer being shown gets no note under it
                    await self._safe_fail(work.reply, CANCELLED_TEXT)
            raise
        except LostClaim as exc:
            log.warning("%s", exc)
            outcome = Outcome.DUPLICATE
            return outcome
        except Exception:
            log.exception("failed to handle %s event %s", platform, work.event.event_id)
            await self._give_up(work)
            return outcome
        finally:
            work.answered.set()
            metrics.MESSAGES.labels(platform, outcome.value).inc()
            self._work.pop(work.event.id, None)
            self._by_key.pop((platform, work.event.event_id), None)

    async def _wait_turn(self, work: _Work) -> None:
        """Until every earlier message of the conversation is answered (arrival order)."""
        while True:
            ahead = await self._storage.nearest_unanswered_before(work.event)
            if ahead is None:
                return
            mine = self._work.get(ahead.id)
            if mine is not None:  # it waits for those before it: one poller per chain, not per message
                await mine.answered.wait()
            else:  # another replica's, or one the next sweep takes over
                await asyncio.sleep(TURN_POLL_S)

    async def _answer(self, work: _Work) -> Outcome:
        message = await self._resolved(work.message)
        message = replace(message, text=clean_user_text(message.text))
        channel, text = message.channel, message.text
        if not self._allowed(message):
            if self._settings.access_denied_mode is DeniedMode.SILENT:
                return await self._skip(work, Outcome.IGNORED)
            return await self._reply_text(work, REFUSAL_TEXT, Outcome.REFUSED)
        if message.followup_only and not await self._storage.has_history(channel):
            return await self._skip(work, Outcome.IGNORED)

        command = message.command or read_command(text)
        if command is Command.CHAT and not text:
            return await self._reply_text(work, EMPTY_TEXT, Outcome.REJECTED)
        if command is Command.HELP:
            return await self._reply_text(work, HELP_TEXT, Outcome.COMMAND)
        if command is Command.RESET and not message.may_reset:
            return await self._reply_text(work, RESET_REFUSAL, Outcome.REFUSED)
        if command is Command.RESET:
            await self._storage.clear(channel, event=work.event, final_text=RESET_TEXT)
            work.final = (RESET_TEXT, FinalKind.TEXT)
            return Outcome.COMMAND

        limit = self._settings.max_message_chars
        if len(text) > limit:
            note = (
                f"Your message is {len(text):,} characters long; the limit is {limit:,}. Please shorten it."
            )
            return await self._reply_text(work, note, Outcome.REJECTED)
        budget = self._token_budget()
        if self._service.prompt_tokens(text, ()) > budget:
            note = (
                f"Your message is too long for the model's context ({budget:,} tokens are available "
                "for the prompt). Please shorten it."
            )
            return await self._reply_text(work, note, Outcome.REJECTED)

        history = await self._history(channel, text, budget)
        started = time.monotonic()
        if not await self._storage.set_status(work.event, EventStatus.GENERATING):
            raise LostClaim(f"{work.event.platform} event {work.event.event_id} was taken over")
        if work.saved_handle is None:
            # The intent, before the placeholder is posted: if this process dies before the handle
            # is stored, "{}" tells the next one that a placeholder may exist (reply_for finds it).
            await self._storage.save_reply_handle(work.event, {})
            work.saved_handle = {}
        await work.reply.begin()
        await self._save_handle(work)
        answer = await self._generate(work, message, history)
        if answer is None:
            return Outcome.FAILED
        final = answer or EMPTY_ANSWER_TEXT
        await self._storage.append_turn(
            channel,
            author_id=message.author_id,
            author_name=message.author_name,
            user_text=text,
            user_tokens=self._service.count_tokens(text),
            assistant_text=answer,
            assistant_tokens=self._service.count_tokens(answer),
            event=work.event,
            final_text=final,
        )
        work.final = (final, FinalKind.TEXT)
        # One line per answer for operators: where, how much, how long; never the words.
        log.info(
            "answered %s: %d history turns, %d answer tokens, %.1f s",
            channel,
            len(history),
            self._service.count_tokens(answer),
            time.monotonic() - started,
        )
        return Outcome.ANSWERED

    async def _generate(self, work: _Work, message: IncomingMessage, history: tuple[Turn, ...]) -> str | None:
        """Stream the answer into the reply; None (with the reason in the outbox) if it did not
        complete."""
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
        pacer = _EditPacer(work.reply, settings.stream_interval, self._clock, lambda: self._save_handle(work))
        try:
            stream = self._service.stream(request)
            async for delta in stream:
                parts.append(delta)
                pacer.offer("".join(parts))
        except ServiceError as exc:
            await self._save_final(work, str(exc), FinalKind.ERROR)
            return None
        finally:
            await pacer.close()
            work.next_write_at = pacer.next_write_at
        assert stream.result is not None
        return stream.result.text

    async def _deliver(self, work: _Work) -> None:
        """Show the final text, retrying what may succeed later, until the platform confirms it
        (delivered) or refuses it for good (failed, with one honest note)."""
        assert work.final is not None
        text, kind = work.final
        attempts = work.event.attempts
        wait = work.next_write_at - self._clock()
        if wait > 0:
            await asyncio.sleep(min(wait, self._settings.stream_interval))
        while True:
            try:
                await (work.reply.fail(text) if kind is FinalKind.ERROR else work.reply.finish(text))
            except Exception as exc:
                error = exc if isinstance(exc, DeliveryError) else DeliveryError(repr(exc), transient=True)
                await self._save_handle(work)
                attempts += 1
                if not error.transient or attempts >= DELIVERY_ATTEMPTS:
                    log.warning(
                        "%s event %s: the answer could not be shown: %s",
                        work.event.platform,
                        work.event.event_id,
                        error.reason,
                    )
                    await self._storage.set_status(work.event, EventStatus.FAILED, error=error.reason)
                    await self._safe_fail(work.reply, f"I could not show this answer ({error.reason}).")
                    return
                delay = error.retry_after
                if delay is None:
                    delay = min(DELIVERY_FIRST_RETRY_S * 2 ** (attempts - 1), DELIVERY_MAX_RETRY_S)
                retry_at = datetime.now(UTC) + timedelta(seconds=delay)
                await self._storage.delivery_failed(work.event, attempts, error.reason, retry_at)
                log.info(
                    "delivery of %s event %s failed (%s); retrying",
                    work.event.platform,
                    work.event.event_id,
                    error.reason,
                )
                await asyncio.sleep(delay)
                self._refresh_reply(work)
                continue
            await self._save_handle(work)
            await self._storage.set_status(work.event, EventStatus.DELIVERED)
            return

    # -- helpers -------------------------------------------------------------------------------

    async def _accept_only(self, work: _Work) -> None:
        """While shutting down: acknowledge on the platform (a slash command's defer) and keep
        the handle, so the next start answers in the same place."""
        try:
            await work.reply.accept()
            await self._save_handle(work)
        except Exception:
            log.exception("could not acknowledge %s event %s", work.event.platform, work.event.event_id)

    async def _resolved(self, message: IncomingMessage) -> IncomingMessage:
        adapter = self._adapters.get(message.channel.platform)
        if adapter is None:
            return message
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                return await adapter.resolve(message)
        except Exception:
            log.warning(
                "could not look up the names in %s event %s", message.channel.platform, message.event_id
            )
            return message

    def _reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> ReplyHandle | None:
        adapter = self._adapters.get(message.channel.platform)
        return adapter.reply_for(message, handle) if adapter is not None else None

    def _refresh_reply(self, work: _Work) -> None:
        """The adapter reconnected since ``work``'s reply was made (its old connection is closed):
        continue in the same messages through the new one."""
        connection = self._connections.get(work.event.platform, 0)
        if work.connection == connection:
            return
        work.connection = connection
        work.reply = self._reply_for(work.message, work.saved_handle) or work.reply

    async def _save_handle(self, work: _Work) -> None:
        handle = work.reply.handle
        if handle != work.saved_handle:
            await self._storage.save_reply_handle(work.event, handle)
            work.saved_handle = dict(handle) if handle is not None else None

    async def _save_final(self, work: _Work, text: str, kind: FinalKind) -> None:
        if not await self._storage.save_final(work.event, text, kind):
            raise LostClaim(f"{work.event.platform} event {work.event.event_id} was taken over")
        work.final = (text, kind)

    async def _reply_text(self, work: _Work, text: str, outcome: Outcome) -> Outcome:
        await self._save_final(work, text, FinalKind.TEXT)
        return outcome

    async def _skip(self, work: _Work, outcome: Outcome) -> Outcome:
        await self._storage.set_status(work.event, EventStatus.SKIPPED)
        await work.reply.withdraw()
        return outcome

    async def _give_up(self, work: _Work) -> None:
        """After an unexpected error: one honest note, through the outbox like any answer."""
        try:
            if work.final is None:
                await self._save_final(work, FAILURE_TEXT, FinalKind.ERROR)
            await self._deliver(work)
        except Exception:
            log.exception("could not deliver a failure note")

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

    def _window_start(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=self._settings.recover_window_s)

    async def _maintain(self) -> None:
        """The heartbeat (leases) and, beside it so a long sweep never delays a renewal, the
        sweep (dead replicas' events, expired ones)."""
        every = min(self._settings.lease_s / 3, 5.0)
        sweep: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(every)
                try:
                    await self._storage.renew_leases()
                except Exception:
                    log.exception("renewing the leases failed; retrying")
                if sweep is None or sweep.done():
                    sweep = asyncio.create_task(self._sweep(), name="delivery-sweep")
        finally:
            if sweep is not None:
                sweep.cancel()

    async def _sweep(self) -> None:
        try:
            await self._storage.expire_events(self._window_start())
            await self.recover()
        except Exception:
            log.exception("the delivery sweep failed; retrying")

    @staticmethod
    async def _safe_fail(reply: ReplyHandle, reason: str) -> None:
        try:
            await reply.fail(reason)
        except Exception:
            log.exception("could not deliver a failure note")
