"""``chatglm-bot doctor``: check, in a few seconds and without loading weights, what a start needs.

Each line is ``ok`` / ``problem`` (the bot would not start or a feature would not work) / ``note``
(works, but worth knowing), with what to do. The exit code is 1 when any check found a problem.
"""

from __future__ import annotations

import asyncio
import json
import platform
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiohttp
import yaml
from alembic.script import ScriptDirectory
from sqlalchemy import text

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
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as http,
            http.get(f"{base}/models", headers=headers) as response,
        ):
            status = response.status
            body = await response.json(content_type=None) if status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check(
            "problem", "backend", f"{base}/models unreachable ({type(exc).__name__})", "start the server"
        )
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
    """The Slack and Discord token checks alone (cheap HTTP calls)."""
    return await _platforms(settings)


async def _platforms(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        if settings.slack_bot_token is not None:
            checks.append(await _slack(settings, http))
        if settings.discord_bot_token is not None:
            checks.append(await _discord(settings, http))
    if not checks:
        checks.append(Check("note", "platforms", "none configured: `chatglm-bot run` starts a console chat"))
    return checks


async def _slack(settings: Settings, http: aiohttp.ClientSession) -> Check:
    assert settings.slack_bot_token is not None
    url = settings.slack_api_url.rstrip("/") + "/auth.test"
    headers = {"Authorization": f"Bearer {settings.slack_bot_token.get_secret_value()}"}
    try:
        async with http.post(url, headers=headers) as response:
            body = await response.json(content_type=None)
            scopes = response.headers.get("x-oauth-scopes")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check("problem", "slack", f"{settings.slack_api_url} unreachable ({type(exc).__name__})")
    if not isinstance(body, dict) or not body.get("ok"):
        error = body.get("error") if isinstance(body, dict) else "not a Slack answer"
        reason = f"Slack rejected SLACK_BOT_TOKEN (auth.test: {error})"
        return Check("problem", "slack", reason, "copy the bot token (xoxb-...) again", rejected=True)
    mode = "Socket Mode" if settings.slack_app_token else "HTTP events"
    wanted = _manifest_scopes()
    if scopes is not None:
        missing = sorted(wanted - {scope.strip() for scope in scopes.split(",")})
        if missing:
            return Check(
                "problem",
                "slack",
                f"signed in as {body.get('user')}, but the token lacks {', '.join(missing)}",
                "add the scopes from adapters/slack_manifest.yaml and reinstall the app",
            )
    return Check(
        "ok", "slack", f"signed in as {body.get('user')} ({mode}; manifest asks {len(wanted)} scopes)"
    )


def _manifest_scopes() -> set[str]:
    manifest = yaml.safe_load(resources.files("adapters").joinpath("slack_manifest.yaml").read_text())
    return set(manifest["oauth_config"]["scopes"]["bot"])


async def _discord(settings: Settings, http: aiohttp.ClientSession) -> Check:
    assert settings.discord_bot_token is not None
    url = settings.discord_api_url.rstrip("/") + "/users/@me"
    headers = {"Authorization": f"Bot {settings.discord_bot_token.get_secret_value()}"}
    try:
        async with http.get(url, headers=headers) as response:
            status = response.status
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check("problem", "discord", f"{settings.discord_api_url} unreachable ({type(exc).__name__})")
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
