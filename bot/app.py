"""The composition root: settings -> storage, model service, core, adapters, HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bot import http
from bot.config import ConfigError, Settings
from bot.core import Bot
from bot.events import Adapter, Handler
from bot.generation import Generator, GeneratorFactory
from bot.service import ModelService
from storage.repository import Storage

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0
RETRY_FIRST_S = 2.0  # an unreachable platform is retried after 2 s, 4 s, ... at most every 60 s
RETRY_MAX_S = 60.0
UNREACHABLE = (ConnectionError, OSError, aiohttp.ClientError, TimeoutError)


def check_settings(settings: Settings) -> None:
    """Fail fast, with one clear line, on what would otherwise fail later and less clearly."""
    if settings.slack_enabled and not settings.slack_socket_mode and settings.slack_signing_secret is None:
        raise ConfigError(
            "SLACK_BOT_TOKEN is set but neither SLACK_SIGNING_SECRET (HTTP Events API) "
            "nor SLACK_APP_TOKEN (Socket Mode) is"
        )
    path = settings.model_path
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"BOT_MODEL_PATH: model folder {path!r} does not exist")


def model_factory(settings: Settings) -> GeneratorFactory:
    """Loads ChatGLM2 on the inference thread (torch never runs on the event loop)."""

    def load() -> Generator:
        from bot.model.chat import ChatGLM2Generator
        from bot.model.loader import ModelLoadError
        from bot.model.threads import default_threads

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
    """Run until SIGTERM/SIGINT, or until the console adapter's chat ends."""
    storage = await Storage.open(settings.database_url)
    service = ModelService(
        model_factory(settings), queue_size=settings.queue_size, timeout_s=settings.request_timeout_s
    )
    adapters: list[Adapter] = []
    runner: web.AppRunner | None = None
    supervisor = _Supervisor()
    try:
        log.info("loading the model from %s", settings.model_path)
        await service.start()
        bot = Bot(settings, storage, service)
        http_app = http.create_app(lambda: _health(service, supervisor.states))
        adapters = [console] if console is not None else platform_adapters(settings, http_app)
        if console is None:
            runner = await http.start_server(http_app, settings.http_host, settings.http_port)
        started = [adapter for adapter in adapters if await supervisor.start(adapter, bot.handle)]
        await bot.recover({adapter.platform: adapter for adapter in started})
        await _wait_until_stopped(settings, storage, console, supervisor.fatal)
    finally:
        await supervisor.close()
        await _shutdown(adapters, runner, service, storage)


class _Supervisor:
    """Starts adapters; one that cannot be reached is retried in the background with capped
    exponential backoff while the others run. Rejected credentials (ConfigError) stop the bot."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}  # platform -> "connecting" | "connected" | "down"
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._retries: set[asyncio.Task[None]] = set()

    async def start(self, adapter: Adapter, handler: Handler) -> bool:
        """Whether ``adapter`` is running now; if it is unreachable, a retry is scheduled."""
        if await self._attempt(adapter, handler):
            return True
        task = asyncio.create_task(self._retry(adapter, handler), name=f"retry-{adapter.platform}")
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return False

    async def _attempt(self, adapter: Adapter, handler: Handler) -> bool:
        self.states[adapter.platform] = "connecting"
        try:
            await adapter.start(handler)
        except UNREACHABLE as exc:
            self.states[adapter.platform] = "down"
            log.warning("%s is unreachable, retrying in the background: %s", adapter.platform, exc)
            return False
        except BaseException:
            self.states[adapter.platform] = "down"
            raise
        self.states[adapter.platform] = "connected"
        log.info("%s adapter started", adapter.platform)
        return True

    async def _retry(self, adapter: Adapter, handler: Handler) -> None:
        delay = RETRY_FIRST_S
        try:
            while True:
                await asyncio.sleep(delay)
                if await self._attempt(adapter, handler):
                    return
                delay = min(delay * 2, RETRY_MAX_S)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # rejected credentials, or a bug: end the bot as at start-up
            if not self.fatal.done():
                self.fatal.set_exception(exc)

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)


def _health(service: ModelService, states: dict[str, str]) -> dict[str, object]:
    return {"queue_depth": service.queue_depth, "in_flight": service.in_flight, "adapters": dict(states)}


async def _wait_until_stopped(
    settings: Settings, storage: Storage, console: Adapter | None, fatal: asyncio.Future[None]
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM,) if console is not None else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    waiters: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(stop.wait()),
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
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _prune_forever(settings: Settings, storage: Storage) -> None:
    while True:
        cutoff = datetime.now(UTC) - timedelta(hours=settings.event_retention_hours)
        try:
            pruned = await storage.prune_events(cutoff)
            if pruned:
                log.info("pruned %d old processed-event records", pruned)
        except Exception:
            log.exception("pruning processed events failed")
        await asyncio.sleep(PRUNE_EVERY_S)


async def _shutdown(
    adapters: Sequence[Adapter], runner: web.AppRunner | None, service: ModelService, storage: Storage
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
