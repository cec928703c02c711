"""The native kernel's build and cache: a lock that dies with its holder, a bounded wait with the
fallback, atomic builds, a path-independent key, and no build for ``int4_kernel=torch``.

The compiler is replaced by a fake (``_compile`` writes a placeholder, ``_import`` returns a stub), so
these tests run in seconds; test_kernels.py builds and loads the real kernel."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bot.model.kernels import build
from tests.model.fixture import tiny_dir

REPO = Path(__file__).resolve().parents[2]
AVX2 = frozenset(build.ISA_FLAGS["avx2"])


class FakeBuild:
    """Stands in for the compiler and the import; counts builds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.0) -> None:
        self.compiled: list[Path] = []
        self.seconds = seconds
        monkeypatch.setattr(build, "cpu_flags", lambda: AVX2)
        monkeypatch.setattr(build, "_compile", self.compile)
        monkeypatch.setattr(build, "_import", self.load)
        monkeypatch.setattr(build, "_self_test", lambda module: None)

    def compile(self, name: str, directory: Path) -> None:
        time.sleep(self.seconds)
        (directory / f"{name}.so").write_bytes(b"built")
        self.compiled.append(directory)

    def load(self, name: str, library: Path) -> Any:
        assert library.read_bytes() == b"built"  # never a half-written build
        return SimpleNamespace(isa="avx2", amx_enabled=lambda: False, __file__=str(library))


def lock_path(cache: Path) -> Path:
    directory = build.build_dir(cache, compiler_version())
    return directory.with_name(f"{directory.name}.lock")


def compiler_version() -> str:
    compiler = os.environ.get("CXX", "c++")
    return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.partition("\n")[0]


def hold_lock(path: Path) -> subprocess.Popen[str]:
    """A child process holding the build's flock, as a builder mid-compile does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
        "print('locked', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


@pytest.fixture(autouse=True)
def _compiler() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here (part of the cache key)")


def test_a_first_build_logs_before_compiling_and_then_loads_from_cache(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    fake = FakeBuild(monkeypatch)
    with caplog.at_level(logging.INFO, logger=build.__name__):
        module, reason = build._load(tmp_path)
    assert module is not None and reason == "native" and len(fake.compiled) == 1
    assert "compiling the int4 kernel (first start, ~1-2 min)" in caplog.text
    assert "int4 matmul kernel: native avx2 (compiled in 0 s" in caplog.text
    assert "loaded from cache" not in caplog.text
    assert [path.name for path in tmp_path.iterdir() if ".tmp-" in path.name] == []

    caplog.clear()
    # A finished build takes no lock at all: even a held lock does not delay it.
    child = hold_lock(lock_path(tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger=build.__name__):
            module, _ = build._load(tmp_path)
    finally:
        child.kill()
        child.wait()
    assert module is not None and len(fake.compiled) == 1
    assert "loaded from cache" in caplog.text
    assert "waiting" not in caplog.text and "compiling" not in caplog.text


def test_a_lock_left_by_a_killed_builder_does_not_block(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    fake = FakeBuild(monkeypatch)
    lock = lock_path(tmp_path)
    child = hold_lock(lock)
    os.kill(child.pid, signal.SIGKILL)  # as kill -9 or the OOM killer mid-compile
    child.wait()
    half = build.build_dir(tmp_path, compiler_version()).with_name(lock.stem + ".tmp-999999")
    half.mkdir()  # its half-written build
    (half / "partial.o").write_bytes(b"")
    monkeypatch.setenv("BOT_KERNEL_BUILD_WAIT_S", "30")
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger=build.__name__):
        module, _ = build._load(tmp_path)
    assert module is not None and time.monotonic() - started < 5
    assert lock.exists() and len(fake.compiled) == 1 and not half.exists()
    assert "waiting" not in caplog.text


def test_the_wait_for_a_live_builder_is_bounded_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    fake = FakeBuild(monkeypatch)
    monkeypatch.setenv("BOT_KERNEL_BUILD_WAIT_S", "1")
    child = hold_lock(lock_path(tmp_path))
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger=build.__name__):
            module, reason = build._load(tmp_path)
        waited = time.monotonic() - started
    finally:
        child.kill()
        child.wait()
    assert module is None and fake.compiled == []
    assert 1 <= waited < 5
    assert "waiting for another process building the kernel" in caplog.text
    assert "another process has been building the kernel for over 1 s" in reason
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using the float32 reference" in warnings[0].getMessage()


def test_a_waiter_uses_the_build_the_other_process_finished(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    fake = FakeBuild(monkeypatch)
    monkeypatch.setenv("BOT_KERNEL_BUILD_WAIT_S", "30")
    child = hold_lock(lock_path(tmp_path))
    directory = build.build_dir(tmp_path, compiler_version())

    def finish() -> None:  # what the other process does when its compile ends: rename, then unlock
        time.sleep(0.5)
        directory.mkdir()
        name = f"chatglm_int4_{directory.name.removeprefix('int4_native-')}"
        (directory / f"{name}.so").write_bytes(b"built")
        child.kill()

    thread = threading.Thread(target=finish)
    thread.start()
    with caplog.at_level(logging.INFO, logger=build.__name__):
        module, _ = build._load(tmp_path)
    thread.join()
    child.wait()
    assert module is not None and fake.compiled == []
    assert "waiting for another process building the kernel" in caplog.text
    assert "built by another process meanwhile" in caplog.text


def test_a_failed_build_leaves_nothing_in_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    FakeBuild(monkeypatch)

    def broken(name: str, directory: Path) -> None:
        (directory / f"{name}.so").write_bytes(b"half")
        raise build.Unavailable("build failed: out of memory")

    monkeypatch.setattr(build, "_compile", broken)
    assert build._load(tmp_path) == (None, "build failed: out of memory")
    assert [path.suffix for path in tmp_path.iterdir()] == [".lock"]


def test_the_compile_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A builder killed mid-compile (kill -9) leaves no compiler running beside the next start's build."""
    script = (
        "import sys, threading; from pathlib import Path; from bot.model.kernels import build;"
        "build._BUILD_SCRIPT = 'import subprocess; subprocess.run([\\'sleep\\', \\'600\\'])';"
        "threading.Thread(target=build._compile, args=('x', Path(sys.argv[1])), daemon=True).start();"
        "import time; time.sleep(600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO)
    sleeper = None
    try:
        deadline = time.monotonic() + 60
        while not (sleeper := _descendant_sleep(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sleeper, "the build child never started"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(sleeper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(sleeper)  # the build's grandchild (as ninja's compilers) died too
    finally:
        parent.kill()
        if sleeper and _alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def _descendant_sleep(pid: int) -> int | None:
    """The pid of a ``sleep`` process below ``pid`` (two levels: the build child, then its child)."""
    for child in _children(pid):
        for grandchild in _children(child):
            if Path(f"/proc/{grandchild}/comm").read_text().strip() == "sleep":
                return grandchild
    return None


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # every thread's: the build is started off the main one
        with contextlib.suppress(OSError):  # a thread that just ended
            children += [int(part) for part in (task / "children").read_text().split()]
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_cache_folder_without_its_library_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeBuild(monkeypatch)
    directory = build.build_dir(tmp_path, compiler_version())
    directory.mkdir()
    (directory / "build.ninja").write_text("")
    module, _ = build._load(tmp_path)
    assert module is not None and fake.compiled and not (directory / "build.ninja").exists()


def test_two_checkouts_share_one_cache_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = build.build_dir(tmp_path, "g++ 12")
    copy = tmp_path / "other-checkout"
    shutil.copytree(build._HERE, copy)
    monkeypatch.setattr(build, "SOURCES", tuple(copy / path.name for path in build.SOURCES))
    monkeypatch.setattr(build, "HEADERS", tuple(copy / path.name for path in build.HEADERS))
    assert build.build_dir(tmp_path, "g++ 12") == key

    (copy / "vec.h").write_text((copy / "vec.h").read_text() + "\n// changed\n")
    assert build.build_dir(tmp_path, "g++ 12") != key  # the content is in the key
    monkeypatch.undo()
    assert build.build_dir(tmp_path, "g++ 13") != key
    monkeypatch.setattr(build, "_CFLAGS", (*build._CFLAGS, "-DX"))
    assert build.build_dir(tmp_path, "g++ 12") != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert build.build_dir(tmp_path, "g++ 12") != key


def test_torch_int4_kernel_compiles_nothing(tmp_path: Path) -> None:
    """``serve``/``chat`` with BOT_INT4_KERNEL=torch load the model and decode without a build."""
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO);"
        "from bot.app import model_factory; from bot.config import Settings;"
        "from bot.model.kernels import build;"
        "build._compile = lambda *args: sys.exit('compiled');"
        "gen = model_factory(Settings())();"
        "model = gen.model; model.setup_caches(1, 16); import torch;"
        "model(torch.tensor([[1, 2]]), torch.arange(2)); model(torch.tensor([[3]]), torch.tensor([2]));"
        "print(build.backend_name())"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XDG_CACHE_HOME": str(tmp_path),
        "BOT_INT4_KERNEL": "torch",
        "BOT_MODEL_PATH": str(tiny_dir("int4")),
        "BOT_MODEL_DTYPE": "bfloat16",
        "BOT_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "disabled by configuration"
    assert "compiling" not in done.stderr
    assert not (tmp_path / "chatglm-bot").exists()


def test_the_build_wait_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_KERNEL_BUILD_WAIT_S", "12.5")
    assert build.build_wait_s() == 12.5
    monkeypatch.setenv("BOT_KERNEL_BUILD_WAIT_S", "soon")
    assert build.build_wait_s() == build.BUILD_WAIT_S
    monkeypatch.delenv("BOT_KERNEL_BUILD_WAIT_S")
    assert build.build_wait_s() == build.BUILD_WAIT_S
