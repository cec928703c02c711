"""``chatglm-bot doctor`` against real parts: a checkpoint folder, SQLite, fake Slack / Discord, a port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot import doctor
from tests.adapters.discord.fake_discord import FakeDiscord
from tests.adapters.slack.fake_slack import APP_ID, APP_TOKEN, BOT_TOKEN, CONFIG_TOKEN, FakeSlack
from tests.model.fixture import tiny_dir
from tests.support import free_port, make_settings


def _lines(settings: object) -> tuple[int, dict[str, str]]:
    lines: list[str] = []
    code = doctor.run(settings, lines.append)  # type: ignore[arg-type]
    return code, {line.split()[1]: line for line in lines}


def test_a_good_setup_is_all_ok(tmp_path: Path) -> None:
    async def servers() -> tuple[FakeSlack, FakeDiscord]:
        slack = await FakeSlack().start()
        discord = FakeDiscord()
        await discord.start()
        return slack, discord

    loop = asyncio.new_event_loop()
    slack, discord = loop.run_until_complete(servers())
    try:
        settings = make_settings(
            tmp_path,
            model_path=str(tiny_dir("int4")),
            http_port=free_port(),
            slack_bot_token=BOT_TOKEN,
            slack_app_token=APP_TOKEN,
            slack_api_url=slack.api_url,
            discord_bot_token=discord.token,
            discord_api_url=discord.api_url,
        )
        code, lines = loop.run_until_complete(asyncio.to_thread(_lines, settings))
    finally:
        loop.run_until_complete(slack.close())
        loop.run_until_complete(discord.close())
        loop.close()
    assert code == 0, lines
    for name in ("python", "checkpoint", "database", "slack", "discord", "http"):
        assert lines[name].startswith("ok "), lines[name]
    assert "signed in as" in lines["slack"] and "signed in as" in lines["discord"]


def test_problems_are_named_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = make_settings(
            tmp_path,
            model_path=str(tmp_path),  # a folder without a checkpoint
            http_port=busy.getsockname()[1],
            slack_bot_token="xoxb-wrong",
            slack_api_url=f"http://127.0.0.1:{free_port()}/api/",  # nothing listens there
            database_url="postgresql://postgres@127.0.0.1:1/none",
        )
        code, lines = _lines(settings)
    assert code == 1
    assert lines["checkpoint"].startswith("problem") and "config.json" in lines["checkpoint"]
    assert lines["slack"].startswith("problem") and "unreachable" in lines["slack"]
    assert lines["http"].startswith("problem") and "BOT_HTTP_PORT" in lines["http"]
    assert lines["database"].startswith("problem")
    assert "xoxb-wrong" not in "".join(lines.values())


def _doctor_with_slack(
    tmp_path: Path, setup: Callable[[FakeSlack], None] = lambda fake: None, /, **overrides: Any
) -> tuple[int, dict[str, str], FakeSlack]:
    """``doctor`` against a fresh fake Slack (changed by ``setup`` first), with Slack's lines only
    in question: the model checks are the cheap ones (no checkpoint load, no kernel import)."""
    loop = asyncio.new_event_loop()
    fake = loop.run_until_complete(FakeSlack().start())
    setup(fake)
    values: dict[str, Any] = {
        "int4_kernel": "torch",
        "http_port": free_port(),
        "slack_bot_token": BOT_TOKEN,
        "slack_app_token": APP_TOKEN,
        "slack_api_url": fake.api_url,
    }
    try:
        settings = make_settings(tmp_path, **(values | overrides))
        code, lines = loop.run_until_complete(asyncio.to_thread(_lines, settings))
    finally:
        loop.run_until_complete(fake.close())
        loop.close()
    return code, lines, fake


def test_slack_events_are_ok_when_the_token_has_every_scope(tmp_path: Path) -> None:
    code, lines, fake = _doctor_with_slack(tmp_path)
    assert lines["slack"].startswith("ok "), lines["slack"]
    assert lines["slack-event"].startswith("ok "), lines["slack-event"]
    for event in ("app_mention", "message.channels", "message.groups", "message.im"):
        assert event in lines["slack-event"]
    assert lines["slack-mode"].startswith("ok ") and "Socket Mode" in lines["slack-mode"]
    assert [call.token for call in fake.calls_to("apps.connections.open")] == [APP_TOKEN]
    assert "slack-app" not in lines  # no config token: nothing to compare
    assert code == 0, lines


def test_a_missing_scope_names_the_events_it_blocks(tmp_path: Path) -> None:
    def drop_im_history(fake: FakeSlack) -> None:
        assert fake.scopes is not None
        fake.scopes.remove("im:history")

    code, lines, _ = _doctor_with_slack(tmp_path, drop_im_history)
    assert code == 1
    event = lines["slack-event"]
    assert event.startswith("problem") and "message.im (needs im:history)" in event, event
    assert "message.channels" not in event and "reinstall" in event
    assert "im:history" in lines["slack"]  # the scope line says it too, in its own words


def test_without_a_scopes_header_the_events_are_a_note(tmp_path: Path) -> None:
    def no_header(fake: FakeSlack) -> None:
        fake.scopes = None

    code, lines, _ = _doctor_with_slack(tmp_path, no_header)
    assert lines["slack-event"].startswith("note") and "not checked" in lines["slack-event"]
    assert code == 0, lines


def test_a_rejected_app_token_is_a_problem(tmp_path: Path) -> None:
    code, lines, _ = _doctor_with_slack(tmp_path, slack_app_token="xapp-wrong")
    assert code == 1
    mode = lines["slack-mode"]
    assert mode.startswith("problem") and "rejected SLACK_APP_TOKEN" in mode and "invalid_auth" in mode
    assert lines["slack"].startswith("ok "), lines["slack"]  # the bot token is fine


def test_socket_mode_behind_a_failing_proxy_is_not_a_rejected_token(tmp_path: Path) -> None:
    def bad_gateway(fake: FakeSlack) -> None:
        fake.failures["apps.connections.open"] = [(502, {"ok": False, "error": "x"}, {})]

    _, lines, _ = _doctor_with_slack(tmp_path, bad_gateway)
    assert lines["slack-mode"].startswith("problem") and "HTTP 502" in lines["slack-mode"]
    assert "rejected" not in lines["slack-mode"]


def test_http_mode_tells_the_request_url(tmp_path: Path) -> None:
    port = free_port()
    code, lines, fake = _doctor_with_slack(
        tmp_path, slack_app_token=None, slack_signing_secret="shh", http_port=port
    )
    mode = lines["slack-mode"]
    assert mode.startswith("note"), mode
    assert f"http(s)://<your host>:{port}/slack/events" in mode and "app_mention" in mode
    assert fake.calls_to("apps.connections.open") == []
    assert code == 0, lines


def test_http_mode_without_a_signing_secret_is_a_problem(tmp_path: Path) -> None:
    code, lines, _ = _doctor_with_slack(tmp_path, slack_app_token=None)
    assert code == 1
    assert lines["slack-mode"].startswith("problem") and "SLACK_SIGNING_SECRET" in lines["slack-mode"]


def test_the_live_manifest_is_compared_with_the_shipped_one(tmp_path: Path) -> None:
    config = {"slack_app_config_token": CONFIG_TOKEN, "slack_app_id": APP_ID}
    code, lines, fake = _doctor_with_slack(tmp_path, **config)
    assert lines["slack-app"].startswith("ok "), lines["slack-app"]
    [call] = fake.calls_to("apps.manifest.export")
    assert call.token == CONFIG_TOKEN and call.params == {"app_id": APP_ID}
    assert code == 0, lines

    def drift(fake: FakeSlack) -> None:
        fake.manifest["oauth_config"]["scopes"]["bot"].remove("users:read")
        fake.manifest["settings"]["event_subscriptions"]["bot_events"].remove("message.im")
        fake.manifest["settings"]["socket_mode_enabled"] = False

    code, lines, _ = _doctor_with_slack(tmp_path, drift, **config)
    app = lines["slack-app"]
    assert code == 1
    assert app.startswith("problem") and "scope users:read" in app and "event message.im" in app, app
    assert "Socket Mode" in app and "message.groups" not in app


def test_a_refused_manifest_export_says_why(tmp_path: Path) -> None:
    wrong_id = {"slack_app_config_token": CONFIG_TOKEN, "slack_app_id": "A-other"}
    _, lines, _ = _doctor_with_slack(tmp_path, **wrong_id)
    assert lines["slack-app"].startswith("problem") and "invalid_app_id" in lines["slack-app"]
    _, lines, _ = _doctor_with_slack(tmp_path, slack_app_config_token="xoxe-old", slack_app_id=APP_ID)
    assert lines["slack-app"].startswith("problem") and "invalid_auth" in lines["slack-app"]
    _, lines, _ = _doctor_with_slack(tmp_path, slack_app_id=APP_ID)  # the token is missing
    assert lines["slack-app"].startswith("note") and "SLACK_APP_CONFIG_TOKEN" in lines["slack-app"]


def test_an_unreachable_slack_is_a_problem_on_every_line_never_a_traceback(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/api/"
    code, lines, _ = _doctor_with_slack(
        tmp_path, slack_api_url=nowhere, slack_app_config_token=CONFIG_TOKEN, slack_app_id=APP_ID
    )
    assert code == 1
    for name in ("slack", "slack-mode", "slack-app"):
        assert lines[name].startswith("problem") and "unreachable" in lines[name], lines[name]
    assert "slack-event" not in lines  # nothing known about the token's scopes
    assert "Traceback" not in "".join(lines.values())


def test_the_output_never_shows_a_token(tmp_path: Path) -> None:
    tokens = {
        "slack_app_config_token": CONFIG_TOKEN,
        "slack_app_id": APP_ID,
        "slack_signing_secret": "signing-secret-value",
        "discord_bot_token": "discord-secret-token",
        "discord_api_url": f"http://127.0.0.1:{free_port()}",
        "backend": "openai",
        "openai_base_url": f"http://127.0.0.1:{free_port()}/v1",
        "openai_model": "m",
        "openai_api_key": "sk-backend-key",
    }
    shown = ""
    for wrong in ({}, {"slack_app_token": "xapp-wrong"}, {"slack_bot_token": "xoxb-wrong"}):
        _, lines, _ = _doctor_with_slack(tmp_path, **(tokens | wrong))
        assert {"slack", "slack-mode", "slack-app", "discord", "backend"} <= set(lines), lines
        shown += "\n".join(lines.values())
    assert "rejected SLACK_APP_TOKEN" in shown and "rejected SLACK_BOT_TOKEN" in shown
    secrets = [BOT_TOKEN, APP_TOKEN, CONFIG_TOKEN, "xapp-wrong", "xoxb-wrong"]
    secrets += ["signing-secret-value", "discord-secret-token", "sk-backend-key"]
    for secret in secrets:
        assert secret not in shown, secret
