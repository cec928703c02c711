"""Graceful shutdown of the whole app: SIGTERM is handled from before the model loads."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from bot import app
from tests.support import ScriptedGenerator, free_port, make_settings


async def _until(predicate_url: str, status: str, within: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(predicate_url) as resp:
                    report: dict[str, object] = await resp.json()
                    if report.get("status") == status:
                        return report
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"{predicate_url} never reported {status!r}")


async def test_sigterm_while_the_model_loads_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    loading = threading.Event()

    def slow_load() -> ScriptedGenerator:
        loading.set()
        time.sleep(1.0)  # a model load: minutes in real life
        return ScriptedGenerator()

    monkeypatch.setattr(app, "model_factory", lambda settings: slow_load)
    port = free_port()
    run = asyncio.create_task(app.run(make_settings(tmp_path, http_port=port)))
    report = await _until(f"http://127.0.0.1:{port}/healthz", "starting")
    assert report["model"] == "loading"
    await asyncio.to_thread(loading.wait, 5)
    # The default SIGTERM action would end this test process: the bot's handler must be in place.
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(run, 10)
    assert "stopped before the model finished loading" in caplog.text


async def test_health_names_the_replica_and_sigterm_ends_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = ScriptedGenerator()
    monkeypatch.setattr(app, "model_factory", lambda settings: lambda: gen)
    port = free_port()
    settings = make_settings(tmp_path, http_port=port, shutdown_grace_s=0.5, replica_id="replica-x")
    run = asyncio.create_task(app.run(settings))
    report = await _until(f"http://127.0.0.1:{port}/healthz", "ok")
    assert str(report["replica"]).startswith("replica-x#")
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(run, 10)
