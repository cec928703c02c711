"""The one HTTP server: /healthz, /metrics, and routes adapters mount (Slack's /slack/events)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.config import ConfigError

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[dict[str, object]]]


def create_app(health: HealthCheck) -> web.Application:
    app = web.Application(client_max_size=1024**2)

    async def healthz(request: web.Request) -> web.Response:
        # ``status`` is "ok" once everything is up; anything else ("starting", "degraded") is a 503,
        # so a load balancer or orchestrator sends no traffic to a process that cannot answer.
        report = {"status": "ok", **await health()}
        return web.json_response(report, status=200 if report["status"] == "ok" else 503)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    setting: str = "BOT_HTTP",
    handler_cancellation: bool = False,
) -> web.AppRunner:
    """Listen on ``host:port``; a failure is one ConfigError naming ``{setting}_HOST`` / ``_PORT``."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        # One line naming the setting, before the model loads, instead of a traceback after it.
        if isinstance(exc, socket.gaierror):
            raise ConfigError(f"{setting}_HOST: {host!r} does not resolve ({exc.strerror})") from None
        raise ConfigError(
            f"{setting}_PORT: cannot listen on {host}:{port} ({exc.strerror}); stop what uses it or "
            f"set {setting}_PORT"
        ) from None
    log.info("HTTP server listening on %s:%d", host, port)
    return runner
