"""BOT_BACKEND settings, their one-line errors, and doctor's backend check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import doctor
from bot.cli import load_settings
from bot.config import ConfigError, Settings, secret_values
from tests.backend.fake_openai import FakeOpenAI
from tests.support import make_settings


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.close()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"BOT_BACKEND": "openai", "BOT_OPENAI_MODEL": "m"}, "BOT_OPENAI_BASE_URL"),
        ({"BOT_BACKEND": "OpenAI", "BOT_OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "BOT_OPENAI_MODEL"),
        ({"BOT_BACKEND": "vllm"}, "BOT_BACKEND"),
    ],
)
def test_an_incomplete_backend_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(warn=False)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_backend_secrets_are_masked(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, openai_api_key="sk-backend", api_key="sk-api")
    assert {"sk-backend", "sk-api"} <= set(secret_values(settings))
    assert "sk-backend" not in repr(settings)


async def test_doctor_checks_that_the_backend_lists_the_model(tmp_path: Path, fake: FakeOpenAI) -> None:
    def check(**overrides: object) -> Settings:
        settings = make_settings(tmp_path, backend="openai", openai_base_url=fake.base_url, **overrides)
        return settings

    ok = await doctor._backend(check(openai_model="fake-model"))
    assert ok.status == "ok" and "fake-model" in ok.detail
    missing = await doctor._backend(check(openai_model="other"))
    assert missing.status == "problem" and "lists fake-model" in missing.detail
    url = fake.base_url
    await fake.close()
    down = await doctor._backend(
        make_settings(tmp_path, backend="openai", openai_base_url=url, openai_model="m")
    )
    assert down.status == "problem" and "unreachable" in down.detail
    local = await doctor._backend(make_settings(tmp_path))
    assert local.status == "ok" and "local" in local.detail
