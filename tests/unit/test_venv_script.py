"""scripts/_venv.sh: a production install (scripts/run) builds the native kernel once, right after the
install, and never stops the run on a failed build; scripts/test's install (extras "dev") builds nothing.

Runs the real scripts in a copy of the project with a stand-in .venv (its python and chatglm-bot only
record their calls), so nothing is installed and nothing reaches the network."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$(dirname "$0")/../calls"
if [ "$2" = pip ]; then
    echo "WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored"  # a machine's pip.conf
    if [ -n "${FAIL_PIP:-}" ]; then
        echo "ERROR: No matching distribution found for torch==2.13.0" >&2
        exit 1
    fi
fi
if [ "$1" = build-kernel ] && [ -n "${FAIL_BUILD:-}" ]; then echo "boom" >&2; exit 1; fi
exit 0
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "chatglm-bot"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def run(project: Path, script: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    calls = project / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("CHATGLM_BOT_EXTRAS", "FAIL_BUILD", "FAIL_PIP")}
    done = subprocess.run(
        [str(project / "scripts" / script), "doctor"],
        capture_output=True,
        text=True,
        env=clean | env,
        timeout=60,
        cwd=project,
    )
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_a_production_install_builds_the_kernel_once(project: Path) -> None:
    done, calls = run(project, "run")
    assert done.returncode == 0, done.stderr
    assert calls[-2:] == ["chatglm-bot build-kernel", "chatglm-bot doctor"]  # after the install
    assert any(call.startswith("python -m pip install -e .") for call in calls)
    assert "WARNING" not in done.stderr and "pip's output: .venv/install.log" in done.stderr
    assert "is ignored" in (project / ".venv" / "install.log").read_text()

    again, calls = run(project, "run")  # installed: no install, no build
    assert again.returncode == 0, again.stderr
    assert calls == ["chatglm-bot doctor"]


def test_a_failed_build_does_not_stop_the_run(project: Path) -> None:
    done, calls = run(project, "run", FAIL_BUILD="1")
    assert done.returncode == 0, done.stderr
    assert calls[-2:] == ["chatglm-bot build-kernel", "chatglm-bot doctor"]
    assert "falls back to PyTorch's int4 path" in done.stderr


def test_the_test_install_builds_no_kernel(project: Path) -> None:
    # scripts/test ends in pytest: its stand-in python records that instead of running it.
    done, calls = run(project, "test")
    assert done.returncode == 0, done.stderr
    assert any(call.startswith("python -m pip install -e .[dev]") for call in calls)
    assert not any("build-kernel" in call for call in calls)


def test_a_failed_install_shows_the_end_of_pips_log_and_stops(project: Path) -> None:
    done, calls = run(project, "run", FAIL_PIP="1")
    assert done.returncode == 1
    assert "installing chatglm-bot failed; the end of .venv/install.log:" in done.stderr
    assert "No matching distribution found for torch==2.13.0" in done.stderr
    assert "chatglm-bot doctor" not in calls  # nothing ran on a half-done install
    assert not (project / ".venv" / ".chatglm-bot-installed").exists()  # the next run installs again
