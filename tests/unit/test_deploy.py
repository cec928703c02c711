"""Dockerfile and docker-compose.yml (Docker is not installed here: their structure is checked)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from bot.config import env_names
from tests.model.fixture import REPO_ROOT


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return data


def test_compose_runs_two_bots_on_postgres_answered_by_one_api() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "api", "bot"}
    api, bot = services["api"], services["bot"]
    assert api["command"][0] == "api" and bot["command"] == ["serve"]
    assert bot["deploy"]["replicas"] == 2
    env = bot["environment"]
    assert env["BOT_BACKEND"] == "openai"
    port = api["command"][api["command"].index("--port") + 1]
    assert env["BOT_OPENAI_BASE_URL"] == f"http://api:{port}/v1"
    assert re.fullmatch(r"postgresql://chatglm:\S+@postgres:5432/chatglm", env["BOT_DATABASE_URL"])
    # /v1/models lists the checkpoint folder's name, which is what the bots ask for.
    assert api["environment"]["BOT_MODEL_PATH"].rsplit("/", 1)[1] == env["BOT_OPENAI_MODEL"]
    assert env["BOT_OPENAI_API_KEY"] == "${BOT_API_KEY}" and "BOT_API_KEY" in api["environment"]
    checkpoint = api["environment"]["BOT_MODEL_PATH"]
    for service in (api, bot):
        assert any(volume.endswith(f":{checkpoint}:ro") for volume in service["volumes"])
    assert set(bot["depends_on"]) == {"postgres", "api"}


def test_every_setting_compose_sets_is_a_setting() -> None:
    known = env_names()
    for name, service in compose()["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("BOT_"):
                assert variable in known, f"{name}: {variable} is no chatglm-bot setting"


def test_the_image_is_cpu_torch_non_root_and_serves() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile.splitlines()[2] == "FROM python:3.11-slim"
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["chatglm-bot"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    assert "BOT_DATA_DIR=/data" in dockerfile and 'VOLUME ["/data"]' in dockerfile
    names = set(re.findall(r"\b(BOT_[A-Z0-9_]+)=", dockerfile))
    assert names and names <= env_names()
