"""``chatglm-bot build-kernel`` (as a subprocess) and doctor's kernel line: the kernel is built once,
ahead of a start, into the cache a start uses, and a second run or doctor finds it there.

The build-kernel runs stand the compiler in with a copy of this session's real build (the kernel the
other kernel tests built or loaded), so the suite compiles no extra time; everything else is real: the
cache key and place, the lock, the rename into place, the import and the self-test of the .so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bot import doctor
from bot.model.kernels import build
from tests.model.fixture import require_native_kernel
from tests.support import make_settings

REPO = Path(__file__).resolve().parents[2]
# Stands in for the compiler: the session's real .so, copied where the build writes its output.
FAKE_COMPILE = (
    "import shutil, sys; from pathlib import Path; from bot.model.kernels import build;\n"
    "def compile(name, directory):\n"
    "    print('COMPILED', file=sys.stderr); shutil.copy(sys.argv[1], Path(directory) / f'{name}.so')\n"
    "build._compile = compile\n"
)
FAILING_COMPILE = (
    "import sys; from bot.model.kernels import build;\n"
    "def compile(name, directory):\n"
    "    raise build.Unavailable("
    "'build failed: int4_native.cpp:1: error: x\\n  1 | x\\ncompilation terminated.')\n"
    "build._compile = compile\n"
)


def build_kernel(xdg: Path, prelude: str = "", arg: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
    script = prelude + "from bot.cli import main; sys.exit(main(['build-kernel']))"
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + script, arg],
        capture_output=True,
        text=True,
        env=clean | {"XDG_CACHE_HOME": str(xdg), "PYTHONPATH": str(REPO)} | env,
        timeout=300,
        cwd=xdg,
    )


@pytest.fixture
def library() -> Path:
    """This session's built kernel library (built or loaded once for the whole session)."""
    require_native_kernel()
    return Path(build.kernel().__file__)


def test_with_the_torch_path_nothing_is_built(tmp_path: Path) -> None:
    done = build_kernel(tmp_path, FAKE_COMPILE, "/nonexistent.so", BOT_INT4_KERNEL="torch")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "chatglm-bot build-kernel: BOT_INT4_KERNEL=torch runs PyTorch's int4 path: nothing to build"
    ]
    assert "COMPILED" not in done.stderr
    assert not (tmp_path / "chatglm-bot").exists()


def test_a_fresh_cache_is_built_once_then_found(library: Path, tmp_path: Path) -> None:
    isa = build.kernel().isa
    first = build_kernel(tmp_path, FAKE_COMPILE, str(library))
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("COMPILED") == 1
    before, after = first.stdout.strip().splitlines()
    assert before == (
        f"chatglm-bot build-kernel: compiling the native int4 kernel for {isa} once; this takes a few minutes"
    )
    cache = tmp_path / "chatglm-bot" / "kernels"
    match = re.fullmatch(
        rf"chatglm-bot build-kernel: built in \d+ s, cached at ({re.escape(str(cache))}/\S+)", after
    )
    assert match, after
    directory = Path(match[1])
    assert directory.name == library.parent.name  # the key a start computes: same CPU, sources, compiler
    assert (directory / library.name).read_bytes() == library.read_bytes()

    second = build_kernel(tmp_path, FAKE_COMPILE, str(library))
    assert second.returncode == 0, second.stderr
    assert "COMPILED" not in second.stderr
    assert second.stdout.strip().splitlines() == [
        f"chatglm-bot build-kernel: native int4 kernel for {isa} already built (cached at {directory})"
    ]


def test_a_failed_build_exits_1_with_the_reason_on_one_line(tmp_path: Path) -> None:
    if build.expected_isa(build.cpu_flags()) is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no build is tried here (no AVX2 or no compiler)")
    done = build_kernel(tmp_path, FAILING_COMPILE)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("chatglm-bot build-kernel: compiling")
    assert (
        "the build failed (build failed: int4_native.cpp:1: error: x 1 | x compilation terminated.)"
        in lines[1]
    )
    assert "Traceback" not in done.stderr
    assert [path.suffix for path in (tmp_path / "chatglm-bot" / "kernels").iterdir()] == [".lock"]


def test_without_a_compiler_it_says_the_slower_path_runs_and_succeeds(tmp_path: Path) -> None:
    done = build_kernel(tmp_path, CXX="/nonexistent/c++")
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.strip().splitlines()
    assert line.startswith("chatglm-bot build-kernel: not building the native int4 kernel (")
    assert "the bot runs PyTorch's slower int4 path" in line
    if build.expected_isa(build.cpu_flags()) is not None:
        assert "no C++ compiler (/nonexistent/c++)" in line


@pytest.fixture
def doctor_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Doctor looks where a start would: XDG_CACHE_HOME; compiling anything fails the test."""
    if build.expected_isa(build.cpu_flags()) is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no native kernel can be built here (no AVX2 or no compiler)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(build._state, "cache_dir", None)  # as a fresh doctor process: nothing configured

    def no_compile(*args: object) -> None:
        raise AssertionError("doctor compiled")

    monkeypatch.setattr(build, "_compile", no_compile)
    return tmp_path / "chatglm-bot" / "kernels"


def test_doctor_says_the_kernel_is_not_built_yet(doctor_cache: Path, tmp_path: Path) -> None:
    check = doctor._kernel(make_settings(tmp_path))
    assert check.status == "note", check
    assert "not built yet, the first start compiles it" in check.detail
    assert check.advice == "run `chatglm-bot build-kernel` to build it now"
    assert not doctor_cache.exists()  # nothing was built or even prepared


def test_doctor_says_the_kernel_is_built_and_where(library: Path, doctor_cache: Path, tmp_path: Path) -> None:
    # library before doctor_cache: the session's kernel is loaded before compiling is made to fail
    shutil.copytree(library.parent, doctor_cache / library.parent.name)  # as build-kernel left it
    check = doctor._kernel(make_settings(tmp_path))
    assert check.status == "ok", check
    assert check.detail.endswith(f"): built, cached at {doctor_cache / library.parent.name}")
    assert check.detail.startswith(f"native int4 kernel ({build.kernel().isa}")
