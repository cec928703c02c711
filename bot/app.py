"""The composition root: settings -> storage, model service, core, adapters, HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bot import http, metrics
from bot.config import ConfigError, Settings
from bot.core import Bot
from bot.events import Adapter
from bot.generation import Generator, GeneratorFactory
from bot.service import ChatService, ModelService
from storage.repository import Storage

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0
RETRY_FIRST_S = 2.0  # an unreachable platform is retried after 2 s, 4 s, ... at most every 60 s
RETRY_MAX_S = 60.0
UNREACHABLE = (ConnectionError, OSError, aiohttp.ClientError, TimeoutError)


def check_settings(settings: Settings, *, platforms: bool = True, model: bool | None = None) -> None:
    """Fail fast, with one clear line, on what would otherwise fail later and less clearly.

    ``platforms``: whether the Slack / Discord settings matter (not for a console chat, which
    must work in a shell whose environment is set up for ``serve``). ``model``: whether weights will
    be loaded (default: unless BOT_BACKEND=openai; ``api`` always loads them)."""
    slack_http = settings.slack_enabled and not settings.slack_socket_mode
    if platforms and slack_http and settings.slack_signing_secret is None:
        raise ConfigError(
            "SLACK_BOT_TOKEN is set but neither SLACK_SIGNING_SECRET (HTTP Events API) "
            "nor SLACK_APP_TOKEN (Socket Mode) is"
        )
    if not (settings.backend == "local" if model is None else model):
        return  # BOT_MODEL_PATH may only hold a tokenizer for the openai backend
    path = settings.model_path.strip()
    if not path:
        raise ConfigError(
            "BOT_MODEL_PATH is empty: set it to the checkpoint folder (see the README's quick start)"
        )
    local = Path(path).expanduser()
    if local.is_file():
        raise ConfigError(
            f"BOT_MODEL_PATH: {path!r} is a file; give the folder that holds it (config.json, "
            "tokenizer.model and the weights)"
        )
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not local.is_dir():
        raise ConfigError(f"BOT_MODEL_PATH: model folder {path!r} does not exist")
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"BOT_DEVICE=cuda, but this PyTorch ({torch.__version__}) sees no CUDA device; "
                "use BOT_DEVICE=cpu or install a CUDA build of torch (see the README's GPU section)"
            )


def model_factory(settings: Settings) -> GeneratorFactory:
    """Loads ChatGLM2 on the inference thread (torch never runs on the event loop)."""

    def load() -> Generator:
        from bot.model.engine import ChatGLM2Generator
        from bot.model.kernels import native
        from bot.model.loader import ModelLoadError
        from bot.model.threads import default_threads

        # int4_kernel=torch must not compile anything: the decode attention would otherwise build it.
        native.configure(enabled=settings.int4_kernel != "torch")
        try:
            return ChatGLM2Generator.load(
                settings.model_path,
                dtype=settings.model_dtype,
                device=settings.device,
                num_threads=settings.num_threads or default_threads(),
                max_batch_size=settings.max_batch_size,
                prefix_cache_mb=settings.prefix_cache_mb,
                int4_kernel=settings.int4_kernel,
            )
        except ModelLoadError as exc:
            raise ConfigError(f"BOT_MODEL_PATH: {exc}") from None

    return load


def chat_service(settings: Settings) -> ChatService:
    """Where answers come from: the in-process engine, or an OpenAI-compatible server."""
    if settings.backend == "openai":
        from bot.openai_backend import OpenAIService

        return OpenAIService(settings)
    return ModelService(
        model_factory(settings), queue_size=settings.queue_size, timeout_s=settings.request_timeout_s
    )


def platform_adapters(settings: Settings, http_app: web.Application) -> list[Adapter]:
    adapters: list[Adapter] = []
    if settings.slack_enabled:
        from adapters.slack_adapter import SlackAdapter

        adapters.append(SlackAdapter(settings, http_app))
    if settings.discord_enabled:
        from adapters.discord_adapter import DiscordAdapter

        adapters.append(DiscordAdapter(settings))
    return adapters


async def run(settings: Settings, *, console: Adapter | None = None) -> None:
    """Run until SIGTERM/SIGINT, or until the console adapter's chat ends; then shut down
    gracefully (see ``Bot.drain``)."""
    stopping = _StopSignals(console)  # before the model loads: a deploy may stop a loading bot
    storage = await Storage.open(
        settings.database_url,
        data_dir=settings.data_dir,
        replica_id=replica_id(settings, console),
        lease_s=settings.lease_s,
    )
    log.info("database: %s (replica %s)", storage.location, storage.owner)
    service = chat_service(settings)
    adapters: list[Adapter] = []
    runner: web.AppRunner | None = None
    bot: Bot | None = None
    supervisor: _Supervisor | None = None
    try:
        # The HTTP server comes up before the model loads (which can take minutes): /healthz
        # answers 503 "starting", /metrics works, and Slack's events get 503 until the bot is ready.
        http_app = http.create_app(lambda: _health(service, storage, bot, supervisor))
        adapters = [console] if console is not None else platform_adapters(settings, http_app)
        if console is None:
            runner = await http.start_server(http_app, settings.http_host, settings.http_port)
            await _check_tokens(settings)
        if isinstance(service, ModelService):
            log.info("loading the model from %s", settings.model_path)
        if not await stopping.unless_stopped(service.start()):
            log.info("stopped before the model finished loading")
            return
        _check_context(settings, service.max_context_tokens)
        if isinstance(service, ModelService):
            _export_model_metrics(settings, service.generator)
        bot = Bot(settings, storage, service)
        supervisor = _Supervisor(bot)
        if not await stopping.unless_stopped(_start_adapters(supervisor, adapters)):
            log.info("stopped while the platforms were connecting")
            return
        await bot.start()
        await _wait_until_stopped(settings, storage, console, supervisor.fatal, stopping)
    finally:
        stopping.close()
        if bot is not None:
            await bot.drain(settings.shutdown_grace_s)
        if supervisor is not None:
            await supervisor.close()
        await _shutdown(adapters, runner, service, storage)


async def _start_adapters(supervisor: _Supervisor, adapters: Sequence[Adapter]) -> None:
    """All at once: one platform's connect timeout (a minute for Discord's gateway) must not hold
    the others back. The first rejected credentials stop the rest."""
    tasks = [asyncio.create_task(supervisor.start(adapter)) for adapter in adapters]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def replica_id(settings: Settings, console: Adapter | None) -> str:
    """BOT_REPLICA_ID, else this host and HTTP port: unique per live ``serve`` process, and the
    same across its restarts, so a restarted bot resumes its own unfinished answers at once."""
    if settings.replica_id:
        return settings.replica_id
    where = "console" if console is not None else str(settings.http_port)
    return f"{socket.gethostname()}:{where}"


class _StopSignals:
    """SIGTERM (and SIGINT outside the console, where Ctrl-C cancels an answer) requests a stop."""

    def __init__(self, console: Adapter | None) -> None:
        self.requested = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._signals = (signal.SIGTERM,) if console is not None else (signal.SIGTERM, signal.SIGINT)
        for sig in self._signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self._request, sig)

    def _request(self, sig: signal.Signals) -> None:
        if not self.requested.is_set():
            log.info("%s received: shutting down", sig.name)
        self.requested.set()

    async def unless_stopped(self, work: Awaitable[None]) -> bool:
        """Await ``work`` unless a stop is requested first; whether it completed."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False

    def close(self) -> None:
        for sig in self._signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.remove_signal_handler(sig)


async def _check_tokens(settings: Settings) -> None:
    """Rejected platform tokens stop start-up before the (minutes-long) model load; an unreachable
    platform does not: its adapter retries in the background once the model is loaded."""
    from bot import doctor

    for check in await doctor.platform_checks(settings):
        if check.rejected:
            raise ConfigError(f"{check.detail}; {check.advice}")


def _check_context(settings: Settings, model_context: int) -> None:
    """A reply budget that leaves no room for a prompt would refuse every message; say so at start."""
    context = min(settings.max_context_tokens, model_context)
    if settings.max_new_tokens >= context:
        raise ConfigError(
            f"BOT_MAX_NEW_TOKENS ({settings.max_new_tokens}) must be below the model's context of "
            f"{context} tokens (it leaves no room for the prompt); set it to at most {context // 2}, say"
        )


def _export_model_metrics(settings: Settings, generator: Generator) -> None:
    describe = getattr(generator, "describe", None)
    if callable(describe):
        metrics.MODEL_INFO.info({"model": settings.model_path, **describe()})
    cache = getattr(generator, "prefix_cache", None)
    if cache is not None:
        # Read at scrape time; an int read races with nothing that matters.
        metrics.PREFIX_CACHE_BYTES.set_function(lambda: cache.total_bytes)
        metrics.PREFIX_CACHE_ENTRIES.set_function(lambda: len(cache))


class _Supervisor:
    """Starts adapters and keeps them running: one that cannot be reached, or whose connection
    ends for good later, is (re)started in the background with capped exponential backoff while
    the others run. Rejected credentials (ConfigError), at any time, stop the bot."""

    def __init__(self, bot: Bot) -> None:
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bot = bot
        self._adapters: dict[str, Adapter] = {}
        self._states: dict[str, str] = {}  # platform -> "connecting" | "connected" | "down"
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def states(self) -> dict[str, str]:
        """Each platform's state; a connected one says whether its client is reconnecting."""
        return {
            platform: self._adapters[platform].connection() if state == "connected" else state
            for platform, state in self._states.items()
        }

    async def start(self, adapter: Adapter) -> bool:
        """Whether ``adapter`` is running now; if it is unreachable, a retry is scheduled. A
        running adapter is attached to the core, which then resumes its platform's events."""
        self._adapters[adapter.platform] = adapter
        if await self._attempt(adapter):
            return True
        self._spawn(self._retry(adapter), f"retry-{adapter.platform}")
        return False

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, adapter: Adapter) -> bool:
        self._states[adapter.platform] = "connecting"
        try:
            await adapter.start(self._bot)
        except UNREACHABLE as exc:
            self._states[adapter.platform] = "down"
            log.warning("%s is unreachable, retrying in the background: %s", adapter.platform, exc)
            return False
        except BaseException:
            self._states[adapter.platform] = "down"
            raise
        self._states[adapter.platform] = "connected"
        self._bot.attach(adapter)
        self._spawn(self._watch(adapter), f"watch-{adapter.platform}")
        log.info("%s adapter started", adapter.platform)
        return True

    async def _watch(self, adapter: Adapter) -> None:
        """When the connection ends for good: stop the bot if the platform refused the settings,
        else restart the adapter."""
        try:
            await adapter.lost()
        except ConfigError as exc:
            self._states[adapter.platform] = "down"
            self._end(exc)
            return
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
        else:
            reason = "the connection ended"
        self._states[adapter.platform] = "down"
        log.warning("%s connection lost (%s): restarting the adapter", adapter.platform, reason)
        try:
            await adapter.stop()
        except Exception:
            log.exception("stopping the %s adapter failed", adapter.platform)
        await self._retry(adapter)

    async def _retry(self, adapter: Adapter) -> None:
        delay = RETRY_FIRST_S
        try:
            while True:
                await asyncio.sleep(delay)
                if await self._attempt(adapter):
                    return
                delay = min(delay * 2, RETRY_MAX_S)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # rejected credentials, or a bug: end the bot as at start-up
            self._end(exc)

    def _end(self, exc: BaseException) -> None:
        if not self.fatal.done():
            self.fatal.set_exception(exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _health(
    service: ChatService, storage: Storage, bot: Bot | None, supervisor: _Supervisor | None
) -> dict[str, object]:
    database = "ok" if await storage.ping() else "down"
    states = supervisor.states if supervisor is not None else {}
    report: dict[str, object] = {
        "model": "loaded" if bot is not None else "loading",
        "database": database,
        "adapters": dict(states),
        "replica": storage.owner,
    }
    if bot is None:
        return {"status": "starting", **report}
    if not bot.accepting:
        return {"status": "stopping", **report}
    healthy = database == "ok" and all(state == "connected" for state in states.values())
    return {
        "status": "ok" if healthy else "degraded",
        **report,
        "queue_depth": service.queue_depth,
        "in_flight": service.in_flight,
    }


async def _wait_until_stopped(
    settings: Settings,
    storage: Storage,
    console: Adapter | None,
    fatal: asyncio.Future[None],
    stopping: _StopSignals,
) -> None:
    waiters: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(stopping.requested.wait()),
        asyncio.ensure_future(_prune_forever(settings, storage)),
        fatal,
    ]
    closed = getattr(console, "closed", None)
    if closed is not None:
        waiters.append(asyncio.ensure_future(closed()))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in waiters:
            task.cancel()


async def _prune_forever(settings: Settings, storage: Storage) -> None:
    while True:
        cutoff = datetime.now(UTC) - timedelta(hours=settings.event_retention_hours)
        try:
            pruned = await storage.prune_events(cutoff)
            if pruned:
                log.info("pruned %d old processed-event records", pruned)
            if settings.history_retention_days > 0:
                kept_from = datetime.now(UTC) - timedelta(days=settings.history_retention_days)
                forgotten = await storage.prune_history(kept_from)
                if forgotten:
                    log.info(
                        "forgot %d messages older than %g days", forgotten, settings.history_retention_days
                    )
        except Exception:
            log.exception("pruning processed events failed")
        await asyncio.sleep(PRUNE_EVERY_S)


async def _shutdown(
    adapters: Sequence[Adapter], runner: web.AppRunner | None, service: ChatService, storage: Storage
) -> None:
    for adapter in adapters:
        try:
            await adapter.stop()
        except Exception:
            log.exception("stopping the %s adapter failed", adapter.platform)
    if runner is not None:
        await runner.cleanup()
    await service.close()
    await storage.close()
