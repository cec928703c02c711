"""Command line: ``chatglm-bot serve | chat | api | run | generate | doctor | build-kernel | backup |
discord-sync``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from importlib import metadata

from pydantic import ValidationError

from bot import logs
from bot.config import ConfigError, Settings, secret_values, unknown_setting_warnings
from bot.events import PlatformUnreachable

PROG = "chatglm-bot"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, PlatformUnreachable) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A Slack / Discord / console chat bot on ChatGLM2-6B"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('chatglm-bot')}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the configured platform adapters and the HTTP server")
    serve.set_defaults(func=_serve)

    chat = sub.add_parser("chat", help="chat in this terminal")
    chat.add_argument("--session", default="local", help="conversation name (default: local)")
    chat.set_defaults(func=_chat)

    api = sub.add_parser("api", help="serve the model as an OpenAI-compatible API (/v1/chat/completions)")
    api.add_argument("--host", help="address to listen on (default BOT_API_HOST, 127.0.0.1)")
    api.add_argument("--port", type=int, help="port to listen on (default BOT_API_PORT, 8000)")
    api.set_defaults(func=_api)

    run = sub.add_parser("run", help="serve when a platform is configured, else chat")
    run.set_defaults(func=_run, session="local")

    generate = sub.add_parser("generate", help="generate one answer from a model folder")
    from bot.model import cli as model_cli

    model_cli.configure_parser(generate)
    generate.set_defaults(func=model_cli.run)

    doctor = sub.add_parser("doctor", help="check the setup in a few seconds, without loading the model")
    doctor.set_defaults(func=_doctor)

    kernel = sub.add_parser(
        "build-kernel",
        help="compile the native int4 kernel into its cache now (once), so no start compiles it",
    )
    kernel.set_defaults(func=_build_kernel)

    backup = sub.add_parser("backup", help="copy the history database to FILE while the bot runs")
    from bot import backup as backup_command

    backup_command.configure_parser(backup)
    backup.set_defaults(func=lambda args: backup_command.run(args, load_settings()))

    sync = sub.add_parser("discord-sync", help="register the Discord slash commands")
    from adapters import discord_adapter

    discord_adapter.configure_sync_parser(sync)
    sync.set_defaults(func=lambda args: discord_adapter.run_sync(args, load_settings()))
    return parser


def load_settings(*, warn: bool = True) -> Settings:
    for warning in unknown_setting_warnings() if warn else ():
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            raise ConfigError(message) from None
        field = str(error["loc"][0])
        name = field if field.isupper() else f"BOT_{field.upper()}"  # aliases are the env names
        raise ConfigError(f"{name}: {message}") from None


def _prepare(*, quiet: bool = False, platforms: bool | None = None, model: bool | None = None) -> Settings:
    from bot.app import check_settings

    settings = load_settings()
    level = "WARNING" if quiet and settings.log_level == "INFO" else settings.log_level
    logs.configure(level, secret_values(settings))
    check_settings(settings, platforms=not quiet if platforms is None else platforms, model=model)
    return settings


def _serve(args: argparse.Namespace) -> int:
    from bot.app import run

    settings = _prepare()
    if not (settings.slack_enabled or settings.discord_enabled):
        raise ConfigError(
            "no platform is configured: set SLACK_BOT_TOKEN or DISCORD_BOT_TOKEN (or use 'chat')"
        )
    asyncio.run(run(settings))
    return 0


def _api(args: argparse.Namespace) -> int:
    from bot.api.server import run

    settings = _prepare(platforms=False, model=True)  # the API serves the local engine, whatever BOT_BACKEND
    host = settings.api_host if args.host is None else args.host
    port = settings.api_port if args.port is None else args.port
    asyncio.run(run(settings, host, port))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from adapters.console_adapter import ConsoleAdapter
    from bot.app import run

    settings = _prepare(quiet=True)
    # A terminal shows text as it comes; the platforms' one-edit-per-second pace would only lag.
    settings = settings.model_copy(update={"stream_interval": min(settings.stream_interval, 0.05)})
    asyncio.run(run(settings, console=ConsoleAdapter(session=args.session)))
    return 0


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(warn=False)  # serve / chat load them again, and warn then
    return _serve(args) if settings.slack_enabled or settings.discord_enabled else _chat(args)


def _build_kernel(args: argparse.Namespace) -> int:
    from bot.model import build_kernel

    return build_kernel.run(load_settings(warn=False).int4_kernel)


def _doctor(args: argparse.Namespace) -> int:
    from bot import doctor

    return doctor.run(load_settings())
