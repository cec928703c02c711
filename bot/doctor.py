"""``chatglm-bot doctor``: check, in a few seconds and without loading weights, what a start needs.

Each line is ``ok`` / ``problem`` (the bot would not start or a feature would not work) / ``note``
(works, but worth knowing), with what to do. The exit code is 1 when any check found a problem.
"""

from __future__ import annotations

import asyncio
import functools
import json
import platform
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from alembic.script import ScriptDirectory
from pydantic import SecretStr
from sqlalchemy import text

from adapters.slack_events import EVENTS_PATH
from bot.config import Settings
from storage.db import create_engine, mask_url, normalize_url
from storage.migrate import alembic_config

TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Check:
    status: str  # "ok", "problem" or "note"
    name: str
    detail: str
    advice: str = ""
    rejected: bool = False  # a platform refused the credentials: `serve` stops before the model loads

    def line(self) -> str:
        advice = f" -> {self.advice}" if self.advice else ""
        return f"{self.status:<8}{self.name:<12}{self.detail}{advice}"


def run(settings: Settings, out: Callable[[str], None] = print) -> int:
    checks = asyncio.run(_all(settings, out))
    return 1 if any(check.status == "problem" for check in checks) else 0


async def _all(settings: Settings, out: Callable[[str], None]) -> list[Check]:
    checks: list[Check] = []
    local = settings.backend == "local"
    for check in (
        _python(),
        *((_kernel(settings), _checkpoint(settings)) if local else ()),
        await _backend(settings),
        await _database(settings),
        *await _platforms(settings),
        _http_port(settings),
    ):
        checks.append(check)
        out(check.line())
    return checks


async def _backend(settings: Settings) -> Check:
    """BOT_BACKEND=openai: whether the server answers GET /models and lists BOT_OPENAI_MODEL."""
    if settings.backend == "local":
        return Check("ok", "backend", "local: the in-process engine loads BOT_MODEL_PATH")
    base = settings.openai_base_url.strip().rstrip("/")
    key = settings.openai_api_key
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as http:
        answer = await _call(
            http,
            "GET",
            f"{base}/models",
            headers,
            name="backend",
            where=f"{base}/models",
            advice="start the server",
            json_if=lambda status: status == 200,
        )
    if isinstance(answer, Check):
        return answer
    status, body = answer.status, answer.body
    if status in (401, 403):
        return Check(
            "problem", "backend", f"{base}/models answered HTTP {status}", "check BOT_OPENAI_API_KEY"
        )
    data = body.get("data") if isinstance(body, dict) else None
    if status != 200 or not isinstance(data, list):
        return Check("problem", "backend", f"{base}/models answered HTTP {status}, not a model list")
    names = [str(model.get("id")) for model in data if isinstance(model, dict)]
    if settings.openai_model not in names:
        return Check(
            "problem",
            "backend",
            f"{base} does not list BOT_OPENAI_MODEL={settings.openai_model} "
            f"(it lists {', '.join(names) or 'none'})",
            "set BOT_OPENAI_MODEL to one of them",
        )
    return Check("ok", "backend", f"{base} serves {settings.openai_model}")


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's)
    body: Any  # the decoded JSON, or None where ``json_if`` did not ask for it


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    name: str,
    where: str,
    advice: str = "",
    data: Mapping[str, str] | None = None,
    json_if: Callable[[int], bool] = lambda status: True,
) -> _Answer | Check:
    """One request to a platform or server: its answer, or the ready-made ``problem`` line for
    when it could not be asked (no connection, a timeout, an answer that is no JSON)."""
    try:
        async with http.request(method, url, headers=headers, data=data) as response:
            body = await response.json(content_type=None) if json_if(response.status) else None
            return _Answer(response.status, response.headers, body)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check("problem", name, f"{where} unreachable ({type(exc).__name__})", advice)


def _python() -> Check:
    return Check("ok", "python", f"{platform.python_version()} ({sys.executable})")


def _kernel(settings: Settings) -> Check:
    if settings.int4_kernel == "torch":
        return Check("ok", "kernel", "BOT_INT4_KERNEL=torch: PyTorch's int4 path, nothing is compiled")
    from bot.model.kernels import build  # the kernel's own table and cache key (imports torch: ~1-2 s)

    flags = build.cpu_flags()
    isa = build.expected_isa(flags)
    amx = " + AMX-INT8" if {"amx_int8", "amx_tile"} <= flags else ""
    if isa is None:
        return Check("note", "kernel", "no AVX2/AVX512-VNNI: the int4 layers use PyTorch's slower path")
    try:
        where = build.plan()  # the cache key only: runs `c++ --version`, compiles nothing
    except build.Unbuildable as exc:
        return Check(
            "note",
            "kernel",
            f"the CPU has {isa}{amx} but {exc}: PyTorch's slower int4 path",
            "install g++ (apt-get install g++) for the native kernel",
        )
    if where.built:
        return Check("ok", "kernel", f"native int4 kernel ({isa}{amx}): built, cached at {where.directory}")
    return Check(
        "note",
        "kernel",
        f"native int4 kernel ({isa}{amx}): not built yet, the first start compiles it (a few minutes)",
        "run `chatglm-bot build-kernel` to build it now",
    )


def _checkpoint(settings: Settings) -> Check:
    raw = settings.model_path.strip()
    if not raw:
        return Check("problem", "checkpoint", "BOT_MODEL_PATH is empty", "set it to the checkpoint folder")
    path = Path(raw).expanduser()
    if not path.exists():
        if raw.count("/") == 1 and not raw.startswith((".", "/", "~")):
            return Check(
                "note",
                "checkpoint",
                f"BOT_MODEL_PATH={raw} is a hub id: the first start downloads it",
                "download the folder once (see the README's quick start) and point BOT_MODEL_PATH at it",
            )
        return Check("problem", "checkpoint", f"{path} does not exist", "set BOT_MODEL_PATH to the folder")
    if not path.is_dir():
        return Check(
            "problem", "checkpoint", f"{path} is a file", "BOT_MODEL_PATH names the folder holding it"
        )
    missing = [name for name in ("config.json", "tokenizer.model") if not (path / name).is_file()]
    weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    if not weights:
        missing.append("pytorch_model*.bin or *.safetensors")
    if missing:
        return Check("problem", "checkpoint", f"{path} lacks {', '.join(missing)}", "copy the whole folder")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Check("problem", "checkpoint", f"{path / 'config.json'} is unreadable: {exc}")
    size = sum(file.stat().st_size for file in weights) / 1e9
    bits = config.get("quantization_bit") if isinstance(config, dict) else None
    kind = f"int{bits}" if bits else "unquantized"
    return Check("ok", "checkpoint", f"{path} ({kind}, {len(weights)} weight file(s), {size:.1f} GB)")


async def _database(settings: Settings) -> Check:
    try:
        url = normalize_url(settings.database_url, settings.data_dir)
    except Exception as exc:
        return Check("problem", "database", str(exc), "fix BOT_DATABASE_URL")
    shown = mask_url(url.render_as_string(hide_password=False))
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    sqlite_file = Path(str(url.database)) if url.get_backend_name() == "sqlite" else None
    if sqlite_file is not None and not await asyncio.to_thread(sqlite_file.exists):
        return Check("ok", "database", f"{shown} (created at the first start)")
    engine = create_engine(url)
    try:
        async with asyncio.timeout(TIMEOUT_S), engine.connect() as connection:
            has_table = await connection.run_sync(lambda c: c.dialect.has_table(c, "alembic_version"))
            current = (
                await connection.scalar(text("SELECT version_num FROM alembic_version"))
                if has_table
                else None
            )
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return Check("problem", "database", f"{shown}: {reason[0] if reason else type(exc).__name__}")
    finally:
        await engine.dispose()
    if current == head:
        return Check("ok", "database", f"{shown} (schema {current})")
    return Check("ok", "database", f"{shown} (schema {current or 'empty'}; the start migrates it to {head})")


async def platform_checks(settings: Settings) -> list[Check]:
    """The Slack and Discord token checks alone (cheap HTTP calls): what `serve` checks at start."""
    return await _platforms(settings, full=False)


async def _platforms(settings: Settings, *, full: bool = True) -> list[Check]:
    checks: list[Check] = []
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        if settings.slack_bot_token is not None:
            token, granted = await _slack(settings, http)
            checks.append(token)
            if full:
                if token.status == "ok" or granted is not None:
                    checks.append(_slack_events(granted))
                checks.append(await _slack_mode(settings, http))
                if settings.slack_app_config_token is not None or settings.slack_app_id.strip():
                    checks.append(await _slack_app(settings, http))
        if settings.discord_bot_token is not None:
            checks.append(await _discord(settings, http))
    if not checks:
        checks.append(Check("note", "platforms", "none configured: `chatglm-bot run` starts a console chat"))
    return checks


async def _slack(settings: Settings, http: aiohttp.ClientSession) -> tuple[Check, set[str] | None]:
    """The bot token's line, and the scopes Slack says it was granted (None where it did not say)."""
    assert settings.slack_bot_token is not None
    answer = await _slack_call(settings, http, "auth.test", settings.slack_bot_token, name="slack")
    if isinstance(answer, Check):
        return answer, None
    body = answer.body
    if not isinstance(body, dict) or not body.get("ok"):
        error = body.get("error") if isinstance(body, dict) else "not a Slack answer"
        reason = f"Slack rejected SLACK_BOT_TOKEN (auth.test: {error})"
        return Check("problem", "slack", reason, "copy the bot token (xoxb-...) again", rejected=True), None
    mode = "Socket Mode" if settings.slack_app_token else "HTTP events"
    wanted = _manifest_scopes()
    scopes = answer.headers.get("x-oauth-scopes")
    granted = None if scopes is None else {scope.strip() for scope in scopes.split(",") if scope.strip()}
    if granted is not None:
        missing = sorted(wanted - granted)
        if missing:
            return Check(
                "problem",
                "slack",
                f"signed in as {body.get('user')}, but the token lacks {', '.join(missing)}",
                "add the scopes from adapters/slack_manifest.yaml and reinstall the app",
            ), granted
    return Check(
        "ok", "slack", f"signed in as {body.get('user')} ({mode}; manifest asks {len(wanted)} scopes)"
    ), granted


# The bot scope each event subscription needs (Slack's event reference, "Required Scopes").
EVENT_SCOPES = {
    "app_mention": "app_mentions:read",
    "message.channels": "channels:history",
    "message.groups": "groups:history",
    "message.im": "im:history",
    "message.mpim": "mpim:history",
    "reaction_added": "reactions:read",
    "reaction_removed": "reactions:read",
}


def _slack_events(granted: set[str] | None) -> Check:
    """Whether the token's scopes let Slack deliver every event the manifest subscribes to. The
    subscriptions themselves are not readable with the bot token (``_slack_app`` compares those)."""
    if granted is None:
        return Check(
            "note", "slack-event", "Slack did not list the token's scopes (x-oauth-scopes): not checked"
        )
    events = _manifest_events()
    known = [event for event in events if event in EVENT_SCOPES]
    unknown = [event for event in events if event not in EVENT_SCOPES]
    unchecked = f"; {', '.join(unknown)} not checked" if unknown else ""
    blocked = [
        f"{event} (needs {EVENT_SCOPES[event]})" for event in known if EVENT_SCOPES[event] not in granted
    ]
    if blocked:
        return Check(
            "problem",
            "slack-event",
            f"the token's scopes cannot receive {', '.join(blocked)}{unchecked}",
            "add the scopes from adapters/slack_manifest.yaml and reinstall the app",
        )
    return Check("ok", "slack-event", f"the token's scopes receive {', '.join(known)}{unchecked}")


async def _slack_mode(settings: Settings, http: aiohttp.ClientSession) -> Check:
    """Socket Mode: whether the app token may open a connection (``apps.connections.open`` only
    returns a websocket URL; nothing is opened). HTTP mode: where Slack must send the events."""
    if settings.slack_app_token is None:
        if settings.slack_signing_secret is None:
            return Check(
                "problem",
                "slack-mode",
                "HTTP events mode (no SLACK_APP_TOKEN) needs SLACK_SIGNING_SECRET",
                "set it from the app's Basic Information page, or set SLACK_APP_TOKEN for Socket Mode",
            )
        return Check(
            "note",
            "slack-mode",
            f"HTTP events: Slack must send {', '.join(_manifest_events())} and /chatglm to "
            f"http(s)://<your host>:{settings.http_port}{EVENTS_PATH}",
            "set it as the app's Event Subscriptions and slash command Request URL "
            "(socket_mode_enabled: false in the manifest)",
        )
    answer = await _slack_call(
        settings, http, "apps.connections.open", settings.slack_app_token, name="slack-mode"
    )
    if isinstance(answer, Check):
        return answer
    body = answer.body
    if isinstance(body, dict) and body.get("ok"):
        return Check("ok", "slack-mode", "Socket Mode: SLACK_APP_TOKEN may open a connection")
    if answer.status >= 500 or not isinstance(body, dict):
        return Check("problem", "slack-mode", f"apps.connections.open answered HTTP {answer.status}")
    return Check(
        "problem",
        "slack-mode",
        f"Slack rejected SLACK_APP_TOKEN (apps.connections.open: {body.get('error')})",
        "copy the app-level token (xapp-..., scope connections:write) again",
    )


async def _slack_app(settings: Settings, http: aiohttp.ClientSession) -> Check:
    """With SLACK_APP_CONFIG_TOKEN and SLACK_APP_ID: the app's live manifest
    (``apps.manifest.export``) against adapters/slack_manifest.yaml."""
    config_token, app_id = settings.slack_app_config_token, settings.slack_app_id.strip()
    if config_token is None or not app_id:
        lacking = "SLACK_APP_ID" if config_token is not None else "SLACK_APP_CONFIG_TOKEN"
        return Check("note", "slack-app", f"{lacking} is not set: the app's live manifest is not compared")
    answer = await _slack_call(
        settings, http, "apps.manifest.export", config_token, name="slack-app", data={"app_id": app_id}
    )
    if isinstance(answer, Check):
        return answer
    body = answer.body
    live = body.get("manifest") if isinstance(body, dict) and body.get("ok") else None
    if not isinstance(live, dict):
        if answer.status >= 500 or not isinstance(body, dict):
            return Check("problem", "slack-app", f"apps.manifest.export answered HTTP {answer.status}")
        return Check(
            "problem",
            "slack-app",
            f"Slack refused apps.manifest.export for {app_id} ({body.get('error')})",
            "check SLACK_APP_ID, or create a new SLACK_APP_CONFIG_TOKEN (they last 12 hours)",
        )
    scopes = set(_dig(live, "oauth_config", "scopes", "bot"))
    events = set(_dig(live, "settings", "event_subscriptions", "bot_events"))
    missing = [
        *(f"scope {scope}" for scope in sorted(_manifest_scopes() - scopes)),
        *(f"event {event}" for event in _manifest_events() if event not in events),
    ]
    socket_mode = _dig(live, "settings", "socket_mode_enabled") is True
    if socket_mode != settings.slack_socket_mode:
        missing.append(
            "Socket Mode, which SLACK_APP_TOKEN asks for"
            if settings.slack_socket_mode
            else "Socket Mode off, which HTTP events (no SLACK_APP_TOKEN) need"
        )
    if missing:
        return Check(
            "problem",
            "slack-app",
            f"app {app_id}'s live manifest lacks {', '.join(missing)}",
            "update it from adapters/slack_manifest.yaml (App Manifest page) and reinstall the app",
        )
    return Check("ok", "slack-app", f"app {app_id}'s live manifest has the shipped scopes and events")


def _dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or [] where a level is missing (a manifest leaves empty parts out)."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return []
        data = data[key]
    return data


async def _slack_call(
    settings: Settings,
    http: aiohttp.ClientSession,
    method: str,
    token: SecretStr,
    *,
    name: str,
    data: Mapping[str, str] | None = None,
) -> _Answer | Check:
    """One Slack Web API call (``_call``) with ``token`` as the bearer."""
    return await _call(
        http,
        "POST",
        settings.slack_api_url.rstrip("/") + "/" + method,
        {"Authorization": f"Bearer {token.get_secret_value()}"},
        name=name,
        where=settings.slack_api_url,
        data=data,
    )


@functools.cache
def _manifest() -> dict[str, Any]:
    loaded = yaml.safe_load(resources.files("adapters").joinpath("slack_manifest.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _manifest_scopes() -> set[str]:
    return set(_manifest()["oauth_config"]["scopes"]["bot"])


def _manifest_events() -> list[str]:
    return list(_manifest()["settings"]["event_subscriptions"]["bot_events"])


async def _discord(settings: Settings, http: aiohttp.ClientSession) -> Check:
    assert settings.discord_bot_token is not None
    answer = await _call(
        http,
        "GET",
        settings.discord_api_url.rstrip("/") + "/users/@me",
        {"Authorization": f"Bot {settings.discord_bot_token.get_secret_value()}"},
        name="discord",
        where=settings.discord_api_url,
    )
    if isinstance(answer, Check):
        return answer
    status, body = answer.status, answer.body
    if status == 401:
        return Check(
            "problem", "discord", "Discord rejected DISCORD_BOT_TOKEN", "copy the bot token again", True
        )
    if status != 200 or not isinstance(body, dict):
        return Check("problem", "discord", f"/users/@me answered HTTP {status}")
    return Check("ok", "discord", f"signed in as {body.get('username')} (id {body.get('id')})")


def _http_port(settings: Settings) -> Check:
    try:
        with socket.socket() as sock:
            sock.bind((settings.http_host, settings.http_port))
    except socket.gaierror:
        return Check("problem", "http", f"BOT_HTTP_HOST={settings.http_host} does not resolve")
    except OSError as exc:
        return Check(
            "problem",
            "http",
            f"{settings.http_host}:{settings.http_port} is not free ({exc.strerror})",
            "stop what uses it or set BOT_HTTP_PORT",
        )
    return Check("ok", "http", f"{settings.http_host}:{settings.http_port} is free for /healthz and /metrics")
