"""A real ``chatglm-bot api`` subprocess on a free 127.0.0.1 port, for tests (tiny checkpoint)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.model.fixture import REPO_ROOT, tiny_dir
from tests.support import free_port

HOOKS = Path(__file__).resolve().parent / "hooks"
API_KEY = "test-api-key-5f1c"


def tiny_env(**extra: str) -> dict[str, str]:
    """The tiny float32 checkpoint, greedy-friendly limits, one thread."""
    env = {
        "BOT_MODEL_PATH": str(tiny_dir("fp32")),
        "BOT_MODEL_DTYPE": "float32",
        "BOT_MAX_NEW_TOKENS": "64",
        "BOT_NUM_THREADS": "1",
        "BOT_INT4_KERNEL": "torch",
    }
    env.update(extra)
    return env


@dataclass
class ApiProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return request(f"{self.url}{path}")

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        _, _, body = self.get("/metrics")
        wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
        found = re.search(f"^{pattern}$", body.decode(), re.MULTILINE)
        return float(found.group(1)) if found else 0.0


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a plain HTTP request (POST when ``body`` is given)."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post_json(
    api: ApiProcess, payload: object, key: str | None = API_KEY
) -> tuple[int, dict[str, str], dict[str, Any]]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    status, response_headers, body = request(f"{api.base_url}/chat/completions", raw, headers)
    return status, response_headers, json.loads(body)


@contextmanager
def api_server(
    log_dir: Path, env: dict[str, str], *, ready: bool = True, timeout: float = 90
) -> Iterator[ApiProcess]:
    """``python -m bot api`` on a free port; waits until /healthz answers (200 when ``ready``)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
    clean.update(env)
    clean["PYTHONPATH"] = os.pathsep.join([str(HOOKS), str(REPO_ROOT)])
    log_path = log_dir / f"api-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "api", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=clean,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    api = ApiProcess(process, port, log_path)
    try:
        _wait(api, ready, timeout)
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _wait(api: ApiProcess, ready: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.process.poll() is not None:
            raise AssertionError(f"chatglm-bot api exited with {api.process.returncode}:\n{api.log()}")
        try:
            status, _, _ = api.get("/healthz")
        except OSError:
            status = 0
        if status == 200 or (status == 503 and not ready):
            return
        time.sleep(0.05)
    raise AssertionError(f"chatglm-bot api did not become ready within {timeout} s:\n{api.log()}")
