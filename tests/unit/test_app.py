import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest

from bot import app
from bot.config import ConfigError
from bot.events import IncomingMessage
from tests.support import RecordingReply, ScriptedGenerator, make_settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    assert health == {"status": "ok", "queue_depth": 0, "in_flight": 0}
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

    class Console:
        platform = "console"

        async def start(self, handler):  # type: ignore[no-untyped-def]
            self.reply = RecordingReply()
            self.task = asyncio.create_task(handler(_message(), self.reply))

        async def closed(self) -> None:
            await self.task

        async def stop(self) -> None:
            seen.append(_message())

        def reply_for(self, message: IncomingMessage) -> None:
            return None

    console = Console()
    await asyncio.wait_for(app.run(settings, console=console), 10)
    assert console.reply.final == ("finish", "Answer 1 to: hi")
    assert len(seen) == 1  # stop() was called on the way out


def _message() -> IncomingMessage:
    from bot.events import ChannelRef

    return IncomingMessage("e1", ChannelRef("console", "local"), "u", "u", "hi")


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
