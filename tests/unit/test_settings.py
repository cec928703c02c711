"""Settings that cannot surprise: case-insensitive choices, readable errors, misspelling warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot import cli
from bot.config import ConfigError, Settings, env_names, secret_values, unknown_setting_warnings


def test_choices_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "BOT_DEVICE": "CPU",
        "BOT_MODEL_DTYPE": "Float32",
        "BOT_INT4_KERNEL": "TORCH",
        "BOT_LOG_LEVEL": "debug",
        "BOT_ACCESS_DENIED_MODE": "Silent",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert (settings.device, settings.model_dtype, settings.int4_kernel) == ("cpu", "float32", "torch")
    assert settings.log_level == "DEBUG"
    assert settings.access_denied_mode.value == "silent"


def test_a_bad_choice_lists_the_allowed_values_not_a_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_DEVICE", "tpu")
    with pytest.raises(ConfigError) as error:
        cli.load_settings(warn=False)
    message = str(error.value)
    assert message.startswith("BOT_DEVICE: ")
    assert "'auto'" in message and "'cpu'" in message and "'cuda'" in message
    assert "^(" not in message


def test_a_misspelled_variable_is_named_with_the_closest_setting(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("BOT_DATABSE_URL=sqlite:///x.db\nBOT_MAX_NEW_TOKENS=8\n")
    warnings = unknown_setting_warnings(
        {"BOT_MODEL_PTH": "/models/x", "BOT_TEMPERATURE": "0", "BOT_TEST_POSTGRES_URL": "x", "HOME": "/"},
        str(env_file),
    )
    assert warnings == [
        f"BOT_DATABSE_URL (from {env_file}) is not a chatglm-bot setting and is ignored; "
        "did you mean BOT_DATABASE_URL?",
        "BOT_MODEL_PTH (from environment) is not a chatglm-bot setting and is ignored; "
        "did you mean BOT_MODEL_PATH?",
    ]


def test_load_settings_prints_the_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BOT_TEMPRATURE", "0")
    cli.load_settings()
    assert "BOT_TEMPRATURE (from environment) is not a chatglm-bot setting" in capsys.readouterr().err


def test_the_kernel_build_wait_is_a_known_variable() -> None:
    assert unknown_setting_warnings({"BOT_KERNEL_BUILD_WAIT_S": "60"}, None) == []


def test_the_slack_app_configuration_settings_are_read_and_kept_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLACK_APP_CONFIG_TOKEN", "xoxe.xoxp-config-secret")
    monkeypatch.setenv("SLACK_APP_ID", "A0123")
    settings = Settings(_env_file=None)
    assert settings.slack_app_id == "A0123"
    assert settings.slack_app_config_token is not None
    assert "xoxe.xoxp-config-secret" not in repr(settings)
    assert "xoxe.xoxp-config-secret" in secret_values(settings)  # redacted from every log line
    assert {"SLACK_APP_CONFIG_TOKEN", "SLACK_APP_ID"} <= env_names()
