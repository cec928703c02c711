from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.api.server import API_KEY, ApiProcess, api_server, tiny_env


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """One server for a module's tests: one batch row and a one-request queue (so a full queue is
    easy to reach), 10 ms per token (so a generation can be caught in flight)."""
    env = tiny_env(
        BOT_API_KEY=API_KEY, BOT_MAX_BATCH_SIZE="1", BOT_QUEUE_SIZE="1", BOT_TEST_TOKEN_DELAY_S="0.01"
    )
    log_dir: Path = tmp_path_factory.mktemp("api")
    with api_server(log_dir, env) as process:
        yield process


@pytest.fixture(scope="module")
def client(api: ApiProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url, api_key=API_KEY, max_retries=0, timeout=60)
