"""The installed entry point end to end: real model (tiny fixture), real storage, real console."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.events import ChannelRef
from storage.repository import Storage
from tests.model.fixture import expected, tiny_dir

_HAS_CUDA = __import__("torch").cuda.is_available()
PROMPTS = {p["name"]: p for p in expected()["tokenizer"]["chat_prompts"]}
RUNS = {p["name"]: p for p in expected()["fp32"]}


def run_cli(
    args: list[str], env: dict[str, str], stdin: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean,
        timeout=timeout,
    )


def chat_env(tmp_path: Path) -> dict[str, str]:
    return {
        "BOT_MODEL_PATH": str(tiny_dir("fp32")),
        "BOT_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
        "BOT_TEMPERATURE": "0",
        "BOT_MAX_NEW_TOKENS": "8",
        "BOT_NUM_THREADS": "1",
    }


def test_generate_json_matches_the_official_greedy_output() -> None:
    prompt = PROMPTS["zh_single"]
    result = run_cli(
        [
            "generate",
            "--model",
            str(tiny_dir("fp32")),
            "--greedy",
            "--max-new-tokens",
            "8",
            "--json",
            prompt["query"],
        ],
        {},
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["prompt_ids"] == prompt["input_ids"]
    assert data["output_ids"] == RUNS["zh_single"]["greedy_generate_ids"]
    assert data["text"] == RUNS["zh_single"]["chat_response_greedy_8"]
    assert set(data["timings"]) >= {"load_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert len(data["logits_head"]) == 16


def test_console_chat_answers_like_the_official_chat_and_keeps_history(tmp_path: Path) -> None:
    env = chat_env(tmp_path)
    first = run_cli(["chat"], env, stdin=PROMPTS["zh_single"]["query"] + "\nquit\n")
    assert first.returncode == 0, first.stderr
    assert RUNS["zh_single"]["chat_response_greedy_8"] in first.stdout

    # Seed the official multi-turn history, then ask its last question in a new process.
    async def seed() -> None:
        storage = await Storage.open(env["BOT_DATABASE_URL"])
        channel = ChannelRef("console", "multi")
        for query, response in PROMPTS["multi_turn"]["history"]:
            await storage.append_turn(
                channel,
                author_id="u",
                author_name="u",
                user_text=query,
                user_tokens=1,
                assistant_text=response,
                assistant_tokens=1,
            )
        await storage.close()

    asyncio.run(seed())
    second = run_cli(["chat", "--session", "multi"], env, stdin=PROMPTS["multi_turn"]["query"] + "\n")
    assert second.returncode == 0, second.stderr
    assert RUNS["multi_turn"]["chat_response_greedy_8"] in second.stdout

    async def turns() -> int:
        storage = await Storage.open(env["BOT_DATABASE_URL"])
        try:
            return len(await storage.recent_turns(ChannelRef("console", "multi"), 10))
        finally:
            await storage.close()

    assert asyncio.run(turns()) == 3


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["chat"], {"BOT_MODEL_PATH": "/nonexistent/model"}, "BOT_MODEL_PATH"),
        # A hub id that cannot be fetched (offline: no traffic leaves this machine in tests).
        (["chat"], {"BOT_MODEL_PATH": "nobody/no-such-model", "HF_HUB_OFFLINE": "1"}, "README's quick start"),
        (["chat"], {"BOT_TEMPERATURE": "hot"}, "BOT_TEMPERATURE"),
        (["chat"], {"BOT_MAX_NEW_TOKENS": "9000", "BOT_MAX_CONTEXT_TOKENS": "8192"}, "BOT_MAX_NEW_TOKENS"),
        (["chat"], {"BOT_DATABASE_URL": "mysql://root:hunter2@db/x"}, "database URL"),
        (["serve"], {"SLACK_BOT_TOKEN": "xoxb-secret-token"}, "SLACK_SIGNING_SECRET"),
        (["serve"], {}, "no platform is configured"),
        (["chat"], {"BOT_MODEL_PATH": ""}, "BOT_MODEL_PATH is empty"),
        (["chat"], {"BOT_MODEL_PATH": __file__}, "is a file"),
        (["chat"], {"BOT_DEVICE": "Tpu"}, "BOT_DEVICE"),
        pytest.param(
            ["chat"],
            {"BOT_DEVICE": "cuda"},
            "BOT_DEVICE=cuda",
            marks=pytest.mark.skipif(_HAS_CUDA, reason="this machine has CUDA"),
        ),
    ],
)
def test_misconfiguration_stops_with_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    base = chat_env(tmp_path)
    base.update(env)
    result = run_cli(args, base, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "hunter2" not in result.stderr and "xoxb-secret-token" not in result.stderr


def test_console_chat_survives_non_utf8_input(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
    clean.update(chat_env(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat"],
        input=b"\xff\xfe bad bytes \xc3\n\x00\x01\nquit\n",
        capture_output=True,
        env=clean,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"bot> ") == 2  # both lines were answered, nothing crashed


def test_version_prints_the_installed_version() -> None:
    from importlib import metadata

    result = run_cli(["--version"], {}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"chatglm-bot {metadata.version('chatglm-bot')}"


def test_scripts_run_passes_its_arguments_to_the_command() -> None:
    root = Path(__file__).resolve().parents[1]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
    result = subprocess.run(
        [str(root / "scripts" / "run"), "chat", "--help"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    assert "--session" in result.stdout


def test_chat_works_in_a_shell_set_up_for_serve(tmp_path: Path) -> None:
    # SLACK_BOT_TOKEN without SLACK_SIGNING_SECRET stops `serve`, but a console chat needs neither.
    env = chat_env(tmp_path) | {"SLACK_BOT_TOKEN": "xoxb-secret-token"}
    result = run_cli(["chat", "--session", "serveenv"], env, stdin="hello\nquit\n")
    assert result.returncode == 0, result.stderr
    assert "bot> " in result.stdout
    assert "xoxb-secret-token" not in result.stdout + result.stderr


def test_backup_copies_the_history_and_refuses_to_overwrite(tmp_path: Path) -> None:
    env = chat_env(tmp_path)
    chatted = run_cli(["chat", "--session", "kept"], env, stdin="hello\nquit\n")
    assert chatted.returncode == 0, chatted.stderr
    target = tmp_path / "copy.db"
    result = run_cli(["backup", str(target)], env, timeout=60)
    assert result.returncode == 0, result.stderr

    async def turns() -> int:
        storage = await Storage.open(f"sqlite:///{target}")
        try:
            return len(await storage.recent_turns(ChannelRef("console", "kept"), 10))
        finally:
            await storage.close()

    assert asyncio.run(turns()) == 1
    again = run_cli(["backup", str(target)], env, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"chatglm-bot: error: {target} already exists; give a new file name"
    ]


def test_backup_of_postgresql_names_pg_dump(tmp_path: Path) -> None:
    env = chat_env(tmp_path) | {"BOT_DATABASE_URL": "postgresql://bot:hunter2@db.invalid/chat"}
    result = run_cli(["backup", str(tmp_path / "x.dump")], env, timeout=60)
    assert result.returncode == 2
    assert "pg_dump" in result.stderr and "hunter2" not in result.stderr


def test_a_busy_http_port_stops_serve_with_one_line_before_the_model_loads(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = chat_env(tmp_path) | {"DISCORD_BOT_TOKEN": "discord-secret", "BOT_HTTP_PORT": str(port)}
        result = run_cli(["serve"], env, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"chatglm-bot: error: BOT_HTTP_PORT: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr and "loading the model" not in result.stderr
    assert "discord-secret" not in result.stderr


def test_every_option_of_every_command_has_a_help_text() -> None:
    import argparse

    from bot import cli

    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []
    assert {choice.dest for choice in subparsers._choices_actions} >= {
        "serve",
        "chat",
        "run",
        "generate",
        "doctor",
        "backup",
        "discord-sync",
    }
