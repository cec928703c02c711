import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot import app
from bot.config import ConfigError
from bot.core import Bot
from bot.events import ChannelRef, Core, IncomingMessage, PlatformUnreachable, message_to_dict
from bot.service import ModelService
from storage.repository import Storage
from tests.support import RecordingReply, ScriptedGenerator, SteadyConnection, free_port, make_settings


async def test_serve_exposes_health_and_metrics_and_shuts_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = ScriptedGenerator()
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: gen)
    port = free_port()
    settings = make_settings(tmp_path, http_port=port)
    task = asyncio.create_task(app.run(settings))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        health = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the HTTP server never came up")
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.text()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The replica id defaults to this host and the HTTP port, plus a fresh incarnation.
    assert health.pop("replica").startswith(f"{socket.gethostname()}:{port}#")
    assert health == {
        "status": "ok",
        "model": "loaded",
        "database": "ok",
        "adapters": {},
        "queue_depth": 0,
        "in_flight": 0,
    }
    assert "chatglm_bot_queue_depth" in metrics
    assert "chatglm_bot_tokens_generated_total" in metrics
    # The port is free again: the server was shut down.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_console_run_recovers_and_ends_with_the_chat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = ScriptedGenerator()
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: gen)
    settings = make_settings(tmp_path)
    seen: list[IncomingMessage] = []
    recovered: list[tuple[IncomingMessage, dict[str, Any] | None, RecordingReply]] = []

    class Console(SteadyConnection):
        platform = "console"

        async def start(self, core: Core) -> None:
            self.reply = RecordingReply()
            self.task = asyncio.create_task(core.handle(_message(), self.reply))

        async def closed(self) -> None:
            await self.task
            # "hi" waited for the earlier message's turn, so that one was recovered and answered first.
            assert recovered and recovered[0][2].done.is_set()

        async def stop(self) -> None:
            seen.append(_message())

        async def resolve(self, message: IncomingMessage) -> IncomingMessage:
            return message

        def reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> RecordingReply:
            reply = RecordingReply()
            recovered.append((message, handle, reply))
            return reply

    console = Console()
    # An earlier run of this console (the same replica id) recorded a message and died unanswered.
    earlier = await Storage.open(settings.database_url, replica_id=app.replica_id(settings, console))
    try:
        await earlier.record_event(
            "console", "e0", "console:local", message_to_dict(_message("e0", "earlier question"))
        )
    finally:
        await earlier.close()

    await asyncio.wait_for(app.run(settings, console=console), 10)
    assert console.reply.final == ("finish", "Answer 2 to: hi")  # after the recovered turn
    [(message, handle, reply)] = recovered
    assert (message.event_id, message.text, handle) == ("e0", "earlier question", None)
    assert reply.final == ("finish", "Answer 1 to: earlier question")
    assert len(seen) == 1  # stop() was called on the way out


def _message(event_id: str = "e1", text: str = "hi") -> IncomingMessage:
    return IncomingMessage(event_id, ChannelRef("console", "local"), "u", "u", text)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model_path": "/nonexistent/model"}, "does not exist"),
        ({"model_path": "./missing"}, "does not exist"),
        ({"slack_bot_token": "xoxb-1"}, "SLACK_SIGNING_SECRET"),
    ],
)
def test_check_settings_rejects_misconfiguration(
    tmp_path: Path, overrides: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        app.check_settings(make_settings(tmp_path, **overrides))


def test_check_settings_accepts_a_hub_id_and_a_local_folder(tmp_path: Path) -> None:
    app.check_settings(make_settings(tmp_path, model_path="THUDM/chatglm2-6b-int4"))
    app.check_settings(make_settings(tmp_path, model_path=str(tmp_path)))


async def test_health_and_metrics_answer_while_the_model_is_still_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    release = threading.Event()
    gen = ScriptedGenerator()

    def slow_load() -> ScriptedGenerator:
        release.wait(30)
        return gen

    monkeypatch.setattr(app, "model_factory", lambda settings: slow_load)
    port = free_port()
    task = asyncio.create_task(app.run(make_settings(tmp_path, http_port=port)))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{url}/healthz") as resp:
                        starting = (resp.status, await resp.json())
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the HTTP server did not come up before the model loaded")
            async with http.get(f"{url}/metrics") as resp:
                metrics_status = resp.status
            release.set()
            for _ in range(100):
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        ready = await resp.json()
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("/healthz never became ready after the model loaded")
    finally:
        release.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert starting[1].pop("replica").startswith(f"{socket.gethostname()}:{port}#")
    assert starting == (503, {"status": "starting", "model": "loading", "database": "ok", "adapters": {}})
    assert metrics_status == 200
    assert ready["status"] == "ok"


async def test_max_new_tokens_beyond_the_models_own_context_stops_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = ScriptedGenerator(max_context_tokens=256)
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: gen)
    settings = make_settings(tmp_path, http_port=free_port(), max_new_tokens=512, max_context_tokens=8192)
    with pytest.raises(
        ConfigError, match=r"BOT_MAX_NEW_TOKENS \(512\) must be below the model's context of 256"
    ):
        await asyncio.wait_for(app.run(settings), 10)


class Flaky(SteadyConnection):
    """An adapter whose first ``failures`` starts fail with ``errors`` in turn."""

    platform = "flaky"

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.starts = 0
        self.running = asyncio.Event()

    async def start(self, core: object) -> None:
        self.starts += 1
        if self.errors:
            raise self.errors.pop(0)
        self.running.set()

    async def stop(self) -> None:
        pass

    async def resolve(self, message: IncomingMessage) -> IncomingMessage:
        return message

    def reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> None:
        return None


def _serve_only(monkeypatch: pytest.MonkeyPatch, adapter: Flaky) -> None:
    """``app.run`` with the scripted model and ``adapter`` as its only platform, retried at once."""
    monkeypatch.setattr(app, "model_factory", lambda settings: ScriptedGenerator)
    monkeypatch.setattr(app, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(app, "platform_adapters", lambda settings, http_app: [adapter])


@asynccontextmanager
async def _serving(tmp_path: Path) -> AsyncIterator[None]:
    serving = asyncio.create_task(app.run(make_settings(tmp_path, http_port=free_port())))
    try:
        yield
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving


async def test_an_unreachable_adapter_is_retried_until_it_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = Flaky(PlatformUnreachable("down"), OSError("refused"))
    _serve_only(monkeypatch, flaky)
    async with _serving(tmp_path):
        await asyncio.wait_for(flaky.running.wait(), 10)
    assert flaky.starts == 3


async def test_credentials_rejected_on_a_retry_stop_the_bot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = Flaky(PlatformUnreachable("down"), ConfigError("rejected TOKEN"))
    _serve_only(monkeypatch, flaky)
    with pytest.raises(ConfigError, match="rejected TOKEN"):
        await asyncio.wait_for(app.run(make_settings(tmp_path, http_port=free_port())), 10)


class Dropping(Flaky):
    """An adapter whose connection ends for good, with ``losses`` in turn, after each start."""

    platform = "dropping"

    def __init__(self, *losses: BaseException) -> None:
        super().__init__()
        self.losses = list(losses)
        self.stops = 0
        self.state = "connected"

    async def stop(self) -> None:
        self.stops += 1

    def connection(self) -> str:
        return self.state

    async def lost(self) -> None:
        if self.losses:
            await asyncio.sleep(0.01)
            raise self.losses.pop(0)
        await super().lost()


async def test_an_adapter_whose_connection_ends_is_stopped_and_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropping = Dropping(PlatformUnreachable("gateway gone"), RuntimeError("a bug in the client"))
    _serve_only(monkeypatch, dropping)
    async with _serving(tmp_path):
        for _ in range(500):
            if dropping.starts == 3 and not dropping.losses:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # it stays up now
    assert (dropping.starts, dropping.stops) == (3, 2 + 1)  # each loss, then the shutdown


async def test_a_connection_the_platform_ends_for_bad_settings_stops_the_bot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropping = Dropping(ConfigError("Discord rejected DISCORD_BOT_TOKEN"))
    _serve_only(monkeypatch, dropping)
    with pytest.raises(ConfigError, match="rejected DISCORD_BOT_TOKEN"):
        await asyncio.wait_for(app.run(make_settings(tmp_path, http_port=free_port())), 10)
    assert dropping.starts == 1


async def test_health_reports_an_adapter_that_is_reconnecting(tmp_path: Path) -> None:
    storage = await Storage.open(f"sqlite:///{tmp_path / 'bot.db'}")
    service = ModelService(lambda: ScriptedGenerator())
    bot = Bot(make_settings(tmp_path), storage, service)
    supervisor = app._Supervisor(bot)
    dropping = Dropping()
    assert await supervisor.start(dropping)
    try:
        assert (await app._health(service, storage, bot, supervisor))["status"] == "ok"
        dropping.state = "reconnecting"
        health = await app._health(service, storage, bot, supervisor)
    finally:
        await supervisor.close()
        await service.close()
        await storage.close()
    assert health["status"] == "degraded"
    assert health["adapters"] == {"dropping": "reconnecting"}


async def test_health_is_degraded_when_the_database_does_not_answer(tmp_path: Path) -> None:
    storage = await Storage.open(f"sqlite:///{tmp_path / 'bot.db'}")
    service = ModelService(lambda: ScriptedGenerator())
    bot = Bot(make_settings(tmp_path), storage, service)
    supervisor = app._Supervisor(bot)
    assert await supervisor.start(Flaky())
    try:
        assert await storage.ping()
        assert (await app._health(service, storage, bot, supervisor))["status"] == "ok"

        class Unanswering:
            owner = "elsewhere#1"

            async def ping(self) -> bool:
                return False

        report = await app._health(service, Unanswering(), bot, supervisor)  # type: ignore[arg-type]
    finally:
        await supervisor.close()
        await storage.close()
    assert report["status"] == "degraded" and report["database"] == "down"
    assert report["replica"] == "elsewhere#1"


async def test_health_says_stopping_while_the_bot_drains(tmp_path: Path) -> None:
    storage = await Storage.open(f"sqlite:///{tmp_path / 'bot.db'}", replica_id="here")
    service = ModelService(lambda: ScriptedGenerator())
    bot = Bot(make_settings(tmp_path), storage, service)
    supervisor = app._Supervisor(bot)
    try:
        before = await app._health(service, storage, bot, supervisor)
        await bot.drain(0.1)
        after = await app._health(service, storage, bot, supervisor)
    finally:
        await storage.close()
    assert before["status"] == "ok"
    assert after == {
        "status": "stopping",
        "model": "loaded",
        "database": "ok",
        "adapters": {},
        "replica": storage.owner,
    }
    assert storage.owner.startswith("here#")


def test_the_replica_id_is_the_setting_or_this_host_and_port(tmp_path: Path) -> None:
    host = socket.gethostname()
    assert app.replica_id(make_settings(tmp_path, http_port=8123), None) == f"{host}:8123"
    assert app.replica_id(make_settings(tmp_path), Flaky()) == f"{host}:console"
    assert app.replica_id(make_settings(tmp_path, replica_id="blue-1"), None) == "blue-1"
