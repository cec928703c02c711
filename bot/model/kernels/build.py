"""Build, cache and load the compiled kernels (the C++ files beside this one), or say why not.

The kernels are compiled on first use with torch.utils.cpp_extension (gcc -O3 -march=native
-fopenmp), in a child process, into a temporary folder renamed into a cache directory keyed by the
sources' content, the CPU flags, torch's and Python's versions, the compiler and the flags, so later
processes only import it (no lock). Builders take an flock, which dies with its holder; a process
waits for another's build ``BOT_KERNEL_BUILD_WAIT_S`` at most, then falls back. Where there is no
compiler, no ninja or no supported instruction set, or the kernels are disabled, ``kernel()`` is None
and ops.py computes the exact float32 reference instead; which of them runs is logged once.
``plan()`` tells where the build is or would be cached without compiling (``doctor``), ``build_now()``
builds it ahead of a start (``chatglm-bot build-kernel``).

-march=native picks the instruction set at compile time (int4_isa.h): AVX512-VNNI, else AVX2;
AMX-INT8 serves calls of many token rows where the CPU and the OS have it (``set_amx``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bot.model import int4

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / f"{name}.cpp" for name in ("int4_native", "attention", "pointwise", "decode_step"))
HEADERS = tuple(sorted(_HERE.glob("*.h")))  # included by the sources: part of the build's key
# The kernel's paths, fastest first, with the /proc/cpuinfo flags each needs.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512-vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avx2": ("avx2", "fma"),
}
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
BUILD_WAIT_S = 300.0  # default wait for another process's build (a first build takes ~1-2 min)
_LOCK_POLL_S = 0.25
_COMPILE_TIMEOUT_S = 1800


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enabled = True
        self.cache_dir: Path | None = None
        self.decided = False
        self.module: Any = None
        self.reason = "not built yet"


_state = _State()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chatglm-bot" / "kernels"


def configure(*, enabled: bool = True, cache_dir: Path | None = None) -> None:
    """Set from the application's settings before first use; ``enabled=False`` forces the fallback.

    ``cache_dir`` only matters before the kernel is built; a built kernel stays loaded and is used again
    when re-enabled.
    """
    with _state.lock:
        _state.enabled = enabled
        if cache_dir is not None:
            _state.cache_dir = cache_dir
    if not enabled:
        logger.info("int4 matmul kernel: disabled by configuration; using the float32 reference")


def available() -> bool:
    """Whether ``int4_linear`` runs the native kernel; builds or loads it on the first call."""
    return kernel() is not None


def backend_name() -> str:
    """``"native (<instruction set>[ + amx])"``, or why the kernel is not used."""
    module = kernel()
    if module is not None:
        return f"native ({module.isa}{' + amx' if module.amx_enabled() else ''})"
    return "disabled by configuration" if not _state.enabled else _state.reason


def set_amx(enabled: bool) -> bool:
    """Let calls of many token rows use AMX-INT8 (the default where the CPU and OS have it); returns
    whether they now do. Same results either way: for benchmarks and tests."""
    module = kernel()
    return module is not None and bool(module.set_amx(enabled))


def kernel() -> Any:
    """The loaded extension module, or None (built or loaded on the first call)."""
    if not _state.enabled:
        return None
    if _state.decided:  # the hot path: once per matmul
        return _state.module
    with _state.lock:
        if not _state.decided:
            _state.module, _state.reason = _load(_state.cache_dir or default_cache_dir())
            _state.decided = True
        return _state.module


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def build_dir(cache_dir: Path, compiler_version: str) -> Path:
    """The build's cache folder, keyed by what the .so depends on: the sources' content (not their
    path, so checkouts of the same code share one build), the CPU, torch, Python, compiler and flags."""
    digest = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in SOURCES + HEADERS),
        " ".join(sorted(cpu_flags())).encode(),
        torch.__version__.encode(),
        sys.implementation.cache_tag.encode(),
        compiler_version.encode(),
        " ".join(_CFLAGS + _LDFLAGS).encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir / f"int4_native-{digest.hexdigest()[:16]}"


def build_wait_s() -> float:
    """How long to wait for another process's build before falling back (``BOT_KERNEL_BUILD_WAIT_S``)."""
    raw = os.environ.get("BOT_KERNEL_BUILD_WAIT_S", "")
    try:
        return float(raw) if raw else BUILD_WAIT_S
    except ValueError:
        logger.warning("BOT_KERNEL_BUILD_WAIT_S=%r is not a number; waiting %.0f s", raw, BUILD_WAIT_S)
        return BUILD_WAIT_S


@contextmanager
def _build_lock(path: Path, wait_s: float) -> Iterator[None]:
    """An exclusive flock on ``path``: the kernel releases it when its holder exits or dies (kill -9,
    OOM), so a dead builder never blocks a later start, and a live one is waited for ``wait_s`` at most."""
    with path.open("a") as handle:
        deadline = None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is None:
                    logger.info("waiting for another process building the kernel (up to %.0f s)", wait_s)
                    deadline = time.monotonic() + wait_s
                elif time.monotonic() >= deadline:
                    raise Unavailable(
                        f"another process has been building the kernel for over {wait_s:.0f} s "
                        f"(lock {path}; BOT_KERNEL_BUILD_WAIT_S sets the wait)"
                    ) from None
                time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import(name: str, library: Path) -> ModuleType:
    """Imports a finished build directly (no torch JIT loader, so no lock or rebuild check)."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The build child's prelude: when this process dies (its stdin pipe closes), the child kills its own
# process group, so ninja and the compilers do not run on as orphans beside the next start's build.
_WATCHDOG = (
    "import os, signal, sys, threading;"
    "threading.Thread(target=lambda: (sys.stdin.read(), os.killpg(0, signal.SIGKILL)), daemon=True).start();"
)
_BUILD_SCRIPT = (
    "import json; from torch.utils import cpp_extension;"
    "name, sources, cflags, ldflags, directory = json.loads(sys.argv[1]);"
    "cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,"
    " build_directory=directory, verbose=False)"
)


def _compile(name: str, directory: Path) -> None:
    """Builds ``<directory>/<name>.so`` in a child process (its own process group, which dies with this
    process), so this process only ever imports a finished build from its final place."""
    args = [name, [str(source) for source in SOURCES], list(_CFLAGS), list(_LDFLAGS), str(directory)]
    log = directory / "build.log"
    with log.open("w") as output:
        child = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG + _BUILD_SCRIPT, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = child.wait(timeout=_COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise Unavailable(f"build took over {_COMPILE_TIMEOUT_S} s") from exc
        finally:
            assert child.stdin is not None
            child.stdin.close()
    if code != 0:
        raise Unavailable(f"build failed: {log.read_text(errors='replace').strip()[-500:]}")


def _build_into_cache(name: str, directory: Path) -> str:
    """Builds into a temporary folder beside ``directory`` and renames it into place, so a build cut
    short (killed, out of memory, out of disk) is never found in the cache. The caller holds the lock."""
    for stale in directory.parent.glob(f"{directory.name}.tmp-*"):  # left by a builder that died
        shutil.rmtree(stale, ignore_errors=True)
    temporary = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    temporary.mkdir()
    logger.info("compiling the int4 kernel (first start, ~1-2 min) into %s", directory)
    started = time.monotonic()
    try:
        _compile(name, temporary)
        shutil.rmtree(directory, ignore_errors=True)  # a folder without the .so (deleted by hand) is no build
        os.rename(temporary, directory)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return f"compiled in {time.monotonic() - started:.0f} s"


def _load(cache_dir: Path) -> tuple[ModuleType | None, str]:
    """Builds (or finds in the cache) and imports the extension; logs the outcome once."""
    try:
        module, how = _build(cache_dir)
    except Unavailable as exc:
        logger.warning("int4 matmul kernel unavailable (%s); using the float32 reference", exc)
        return None, str(exc)
    logger.info("int4 matmul kernel: native %s (%s)", module.isa, how)
    if module.amx_enabled():
        logger.info("int4 matmul kernel: AMX-INT8 for calls of %d or more token rows", module.amx_min_tokens)
    return module, "native"


def expected_isa(flags: frozenset[str]) -> str | None:
    """The kernel path a CPU with these flags compiles to, or None."""
    return next((isa for isa, needs in ISA_FLAGS.items() if all(flag in flags for flag in needs)), None)


class Unavailable(Exception):
    """Why the native kernel is not used (the float32 reference runs instead)."""


class Unbuildable(Unavailable):
    """No build can even be tried here: no supported instruction set, no compiler or no ninja."""


@dataclass(frozen=True)
class Plan:
    """Where the kernel for this CPU, these sources, torch, Python and compiler is (or would be) cached."""

    isa: str
    directory: Path
    name: str

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"

    @property
    def built(self) -> bool:
        """A finished build is there (builds are only ever renamed into place whole)."""
        return self.library.exists()


def plan(cache_dir: Path | None = None) -> Plan:
    """The build's cache place, compiling nothing: reads /proc/cpuinfo, runs ``c++ --version`` and hashes
    the sources (well under a second), for ``doctor`` and ``build-kernel``. ``cache_dir`` defaults to the
    configured one, else ``default_cache_dir()``, as a start uses. Raises ``Unbuildable`` where no build
    can be tried (no supported instruction set, no compiler)."""
    isa = expected_isa(cpu_flags())
    if isa is None:
        raise Unbuildable(f"CPU lacks {' and '.join('/'.join(flags) for flags in ISA_FLAGS.values())}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise Unbuildable(f"no C++ compiler ({compiler})")
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.partition("\n")[0]
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unbuildable(f"compiler {compiler} --version failed: {exc}") from exc
    directory = build_dir(cache_dir or _state.cache_dir or default_cache_dir(), version)
    return Plan(isa, directory, f"chatglm_int4_{directory.name.removeprefix('int4_native-')}")


def build_now(where: Plan) -> str:
    """Builds the kernel into ``where`` (or finds it there, or waits for another builder), then loads and
    self-tests it, for ``build-kernel``; returns how (``compiled in N s``, ``loaded from cache``...).
    Raises ``Unbuildable`` where no build can be tried (as no ninja), else ``Unavailable`` if it failed."""
    return _build_at(where)[1]


def _build(cache_dir: Path) -> tuple[ModuleType, str]:
    where = plan(cache_dir)
    module, how = _build_at(where)
    return module, f"{how}, {where.directory}"


def _build_at(where: Plan) -> tuple[ModuleType, str]:
    isa, directory, name, library = where.isa, where.directory, where.name, where.library
    if where.built:  # no lock, no wait
        how = "loaded from cache"
    else:
        check_ninja()
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            with _build_lock(directory.with_name(f"{directory.name}.lock"), build_wait_s()):
                how = (
                    "built by another process meanwhile"
                    if library.exists()
                    else _build_into_cache(name, directory)
                )
        except OSError as exc:
            raise Unavailable(f"cannot build into {directory.parent}: {exc}") from exc
    try:
        module = _import(name, library)
    except ImportError as exc:
        raise Unavailable(f"cannot load {library}: {exc}") from exc
    if module.isa != isa:  # -march=native disagreeing with /proc/cpuinfo: a stale or foreign build
        raise Unavailable(f"built for {module.isa}, expected {isa}")
    _self_test(module)
    return module, how


def check_ninja() -> None:
    from torch.utils import cpp_extension

    # The ninja PyPI package installs its binary beside this interpreter, which need not be on PATH.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join((bin_dir, os.environ.get("PATH", "")))
    if not cpp_extension.is_ninja_available():
        raise Unbuildable("ninja is not installed")


def _self_test(module: Any) -> None:
    """A built kernel that disagrees with the reference (a miscompile, a wrong cache) is not used."""
    gen = torch.Generator().manual_seed(0)
    qweight = torch.randint(-128, 128, (40, 100), dtype=torch.int8, generator=gen)
    x = torch.randn(5, 200, generator=gen)
    scale = torch.full((64,), 0.01)  # padded to the 32-row tiles
    y = module.int4_linear(x, module.pack_official(qweight), scale, 40, None)
    reference = x @ int4.dequantize(qweight, scale[:40], torch.float32).T
    error = ((y - reference).norm() / reference.norm()).item()
    if not error < 0.02:
        raise Unavailable(f"self-test failed: relative error {error:.3g} against the float32 reference")
