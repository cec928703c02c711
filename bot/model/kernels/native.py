"""int4 x int8 matmul in C++ (int4_native.cpp): JIT build, cache, weight repacking, exact fallback.

The kernel has two instruction-set paths over one weight layout, picked at compile time by -march=native:
AVX512-VNNI (VPDPBUSD) and AVX2 (VPMADDUBSW + VPMADDWD); both compute the same integer sums. Where the
CPU (and the OS) also has AMX-INT8, calls of many token rows (prefill) go through its tiles, again with
the same integer sums and the same float steps, so results do not depend on the route (``set_amx``). It is
compiled on first use with torch.utils.cpp_extension (gcc -O3 -march=native -fopenmp), in a child
process, into a temporary folder renamed into a cache directory keyed by the sources' content, the CPU
flags, torch's and Python's versions, the compiler and the flags, so later processes only import it (no
lock). Builders take an flock, which dies with its holder; a process waits for another's build
``BOT_KERNEL_BUILD_WAIT_S`` at most, then falls back. Where there is no compiler, no ninja or neither
instruction set, or the kernel is disabled, ``int4_linear`` computes the exact float32 reference
``x @ (q * scale).T`` instead; which of them runs is logged once.

The same module holds the decode attention (attention.cpp) and the small per-token steps of a bfloat16
forward (pointwise.cpp: RMSNorm, SwiGLU, RoPE with the cache write), which native_layers.py swaps in where the
module is built.
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
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = tuple(_HERE / f"{name}.cpp" for name in ("int4_native", "attention", "pointwise", "decode_step"))
HEADERS = (_HERE / "ops.h", _HERE / "vec.h")  # not compiled on their own, but part of the build's key
BLOCK = 32  # activation values per int8 scale; in_features is padded to a multiple (kBlock in C++)
TILE_ROWS = 32  # output rows per packed tile (kTileRows in C++)
# The kernel's paths, fastest first, with the /proc/cpuinfo flags each needs.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512-vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avx2": ("avx2", "fma"),
}
ATTENTION_DIM_MULTIPLE = 16  # decode_attention's shapes (attention.cpp: kChunk, kLanes)
ATTENTION_MAX_HEADS_PER_GROUP = 16
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
BUILD_WAIT_S = 300.0  # default wait for another process's build (a first build takes ~1-2 min)
_LOCK_POLL_S = 0.25
_COMPILE_TIMEOUT_S = 1800
_CHUNK_ROWS = 4096  # rows converted at once, so packing or the fallback never holds a whole fp32 matrix


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
    return _kernel() is not None


def backend_name() -> str:
    """``"native (<instruction set>[ + amx])"``, or why the kernel is not used."""
    module = _kernel()
    if module is not None:
        return f"native ({module.isa}{' + amx' if module.amx_enabled() else ''})"
    return "disabled by configuration" if not _state.enabled else _state.reason


def set_amx(enabled: bool) -> bool:
    """Let calls of many token rows use AMX-INT8 (the default where the CPU and OS have it); returns
    whether they now do. Same results either way: for benchmarks and tests."""
    module = _kernel()
    return module is not None and bool(module.set_amx(enabled))


def _kernel() -> Any:
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
                    raise _Unavailable(
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
            raise _Unavailable(f"build took over {_COMPILE_TIMEOUT_S} s") from exc
        finally:
            assert child.stdin is not None
            child.stdin.close()
    if code != 0:
        raise _Unavailable(f"build failed: {log.read_text(errors='replace').strip()[-500:]}")


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
    except _Unavailable as exc:
        logger.warning("int4 matmul kernel unavailable (%s); using the float32 reference", exc)
        return None, str(exc)
    logger.info("int4 matmul kernel: native %s (%s)", module.isa, how)
    if module.amx_enabled():
        logger.info("int4 matmul kernel: AMX-INT8 for calls of %d or more token rows", module.amx_min_tokens)
    return module, "native"


def expected_isa(flags: frozenset[str]) -> str | None:
    """The kernel path a CPU with these flags compiles to, or None."""
    return next((isa for isa, needs in ISA_FLAGS.items() if all(flag in flags for flag in needs)), None)


class _Unavailable(Exception):
    pass


def _build(cache_dir: Path) -> tuple[ModuleType, str]:
    isa = expected_isa(cpu_flags())
    if isa is None:
        raise _Unavailable(f"CPU lacks {' and '.join('/'.join(flags) for flags in ISA_FLAGS.values())}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise _Unavailable(f"no C++ compiler ({compiler})")
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.partition("\n")[0]
    except (OSError, subprocess.SubprocessError) as exc:
        raise _Unavailable(f"compiler {compiler} --version failed: {exc}") from exc
    directory = build_dir(cache_dir, version)
    name = f"chatglm_int4_{directory.name.removeprefix('int4_native-')}"
    library = directory / f"{name}.so"
    if library.exists():  # a finished build (only ever renamed into place whole): no lock, no wait
        how = "loaded from cache"
    else:
        _check_ninja()
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            with _build_lock(directory.with_name(f"{directory.name}.lock"), build_wait_s()):
                how = (
                    "built by another process meanwhile"
                    if library.exists()
                    else _build_into_cache(name, directory)
                )
        except OSError as exc:
            raise _Unavailable(f"cannot build into {cache_dir}: {exc}") from exc
    try:
        module = _import(name, library)
    except ImportError as exc:
        raise _Unavailable(f"cannot load {library}: {exc}") from exc
    if module.isa != isa:  # -march=native disagreeing with /proc/cpuinfo: a stale or foreign build
        raise _Unavailable(f"built for {module.isa}, expected {isa}")
    _self_test(module)
    return module, f"{how}, {directory}"


def _check_ninja() -> None:
    from torch.utils import cpp_extension

    # The ninja PyPI package installs its binary beside this interpreter, which need not be on PATH.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join((bin_dir, os.environ.get("PATH", "")))
    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja is not installed")


def _self_test(module: Any) -> None:
    """A built kernel that disagrees with the reference (a miscompile, a wrong cache) is not used."""
    gen = torch.Generator().manual_seed(0)
    qweight = torch.randint(-128, 128, (40, 100), dtype=torch.int8, generator=gen)
    x = torch.randn(5, 200, generator=gen)
    scale = torch.full((64,), 0.01)
    y = module.int4_linear(x, module.pack_official(qweight), scale, 40, None)
    reference = x @ PackedInt4(pack_python(qweight), scale, 40, 200).dequantize().T
    error = ((y - reference).norm() / reference.norm()).item()
    if not error < 0.02:
        raise _Unavailable(f"self-test failed: relative error {error:.3g} against the float32 reference")


@dataclass(frozen=True, eq=False)
class PackedInt4:
    """Per-row-scaled int4 weights ([out, in], value q * scale, q in [-8, 7]) in the kernel's layout.

    ``packed`` holds u = q + 8 nibbles in tiles of 32 rows (layout documented in int4_native.cpp), with
    rows padded to a multiple of 32 and columns to a multiple of BLOCK (padding: q = 0, scale = 0).
    """

    packed: torch.Tensor  # uint8 [tiles * padded_in * 16]
    scale: torch.Tensor  # float32 [tiles * 32]
    out_features: int
    in_features: int

    @property
    def padded_in(self) -> int:
        return self.packed.numel() * 2 // self.scale.numel()

    @classmethod
    def from_official(cls, qweight: torch.Tensor, scale: torch.Tensor) -> PackedInt4:
        """From ChatGLM2-INT4's ``.weight`` (int8 [out, in/2], even column in the high nibble) and
        ``.weight_scale`` ([out])."""
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.numel() == 0:
            raise ValueError(f"qweight must be int8 [out, in/2], got {qweight.dtype} {tuple(qweight.shape)}")
        out, half = qweight.shape
        if not scale.is_floating_point() or scale.shape != (out,):
            raise ValueError(f"scale must be a float [{out}] tensor, got {scale.dtype} {tuple(scale.shape)}")
        module = _kernel()
        qweight = qweight.contiguous()
        # The C++ repacking is ~10x faster; it also puts the weights on huge pages.
        packed = pack_python(qweight) if module is None else module.pack_official(qweight)
        padded_scale = torch.zeros(packed.numel() * 2 // _padded(2 * half, BLOCK), dtype=torch.float32)
        padded_scale[:out] = scale
        return cls(packed, padded_scale, out, 2 * half)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> PackedInt4:
        """Quantizes float weights [out, in] (in even) as the official ``quantize(4)`` does, in fp16:
        scale = max|w| / 7 per row, q = round(w / scale)."""
        if not weight.is_floating_point() or weight.dim() != 2 or weight.shape[1] % 2:
            raise ValueError(
                "weight must be a float [out, in] tensor with even in, "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )
        out, in_features = weight.shape
        scale = torch.empty(out, dtype=torch.float16)
        qweight = torch.empty(out, in_features // 2, dtype=torch.int8)
        for start in range(0, out, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, out)
            w16 = weight[start:stop].to(torch.float16)
            scale[start:stop] = w16.abs().amax(dim=1) / 7
            # An all-zero row has scale 0: its q is 0 (the official 0/0 gives NaN, cast to 0).
            divisor = torch.where(scale[start:stop] > 0, scale[start:stop], 1.0)
            q = torch.round(w16 / divisor[:, None]).clamp_(-8, 7).to(torch.int8)
            qweight[start:stop] = (q[:, 0::2] << 4) | (q[:, 1::2] & 15)
        return cls.from_official(qweight, scale)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the weight as float32, exactly q * scale."""
        stop = self.out_features if stop is None else stop
        if not 0 <= start <= stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) out of [0, {self.out_features})")
        first, last = start // TILE_ROWS, -(-stop // TILE_ROWS)
        padded_in = self.padded_in
        tile_bytes = padded_in * TILE_ROWS // 2
        raw = self.packed[first * tile_bytes : last * tile_bytes].view(last - first, padded_in // 8, 2, 16, 4)
        u = torch.stack((raw & 15, raw >> 4), dim=-1).permute(0, 2, 3, 1, 5, 4)
        q = u.reshape((last - first) * TILE_ROWS, padded_in).float() - 8
        offset = first * TILE_ROWS
        rows = q[start - offset : stop - offset, : self.in_features]
        return rows * self.scale[start:stop, None]


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def pack_python(qweight: torch.Tensor) -> torch.Tensor:
    """The kernel's layout built with torch ops (int4_native.cpp's pack_official without a compiler)."""
    out, half = qweight.shape
    tiles, padded_in = _padded(out, TILE_ROWS) // TILE_ROWS, _padded(2 * half, BLOCK)
    tile_bytes = padded_in * TILE_ROWS // 2
    nibbles = qweight.view(torch.uint8)
    packed = torch.empty(tiles * tile_bytes, dtype=torch.uint8)
    for start in range(0, out, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, out)
        chunk_tiles = _padded(stop - start, TILE_ROWS) // TILE_ROWS
        rows = nibbles[start:stop]
        u = torch.full((chunk_tiles * TILE_ROWS, padded_in), 8, dtype=torch.uint8)
        # q + 8 of a 4-bit two's complement value is the value with its top bit flipped.
        u[: stop - start, : 2 * half] = torch.stack(((rows >> 4) ^ 8, (rows & 15) ^ 8), dim=-1).flatten(1)
        # [tile, group, lane, k8, half, j] -> [tile, k8, group, lane, j, half]
        u = u.view(chunk_tiles, 2, 16, padded_in // 8, 2, 4).permute(0, 3, 1, 2, 5, 4)
        first = start // TILE_ROWS * tile_bytes
        packed[first : first + chunk_tiles * tile_bytes] = (u[..., 0] | (u[..., 1] << 4)).reshape(-1)
    return packed


def int4_linear(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for x [..., in] float32 or bfloat16, result in x's dtype.

    With the kernel, activations are quantized to int8 per row in blocks of 32 values, so the result
    differs from the float32 reference by the activation rounding (~0.5% relative, see the tests);
    without it the result is the float32 reference itself. No autograd.
    """
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise TypeError(f"x must be a float32 or bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise ValueError(f"x must have {w.in_features} features in its last dimension, got {tuple(x.shape)}")
    if bias is not None and bias.shape != (w.out_features,):
        raise ValueError(f"bias must be [{w.out_features}], got {tuple(bias.shape)}")
    rows = x.reshape(-1, w.in_features)
    module = _kernel()
    if module is None:
        y = reference_linear(rows, w, bias).to(x.dtype)
    else:
        b = None if bias is None else bias.to(torch.float32).contiguous()
        y = module.int4_linear(rows.contiguous(), w.packed, w.scale, w.out_features, b)
    return y.view(*x.shape[:-1], w.out_features)


def attention_fits(heads: int, groups: int, dim: int) -> bool:
    """Whether attention.cpp takes these shapes (it checks them again and raises otherwise)."""
    per_group_fits = heads % groups == 0 and heads // groups <= ATTENTION_MAX_HEADS_PER_GROUP
    return dim % ATTENTION_DIM_MULTIPLE == 0 and per_group_fits


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    """One new token per row over bfloat16 caches: q [B, H, D], k/v [B, G, T, D] (contiguous; row b
    sees slots 0..positions[b]) -> [B, H, D] bfloat16, computed in float32 (attention.cpp). None where
    the compiled kernel is not in use or does not take the shapes (D a multiple of 16, at most 16
    query heads per group): the caller then runs PyTorch's path."""
    heads, dim, groups = q.shape[1], q.shape[2], k.shape[1]
    if not attention_fits(heads, groups, dim):
        return None
    module = _kernel()
    if module is None:
        return None
    out: torch.Tensor = module.decode_attention(q.contiguous(), k, v, positions)
    return out


def _required() -> Any:
    module = _kernel()
    if module is None:
        raise RuntimeError(f"the native kernels are not in use: {backend_name()}")
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of bfloat16 x [..., C] (C a multiple of 16) with a bfloat16 weight [C], in float32
    (pointwise.cpp); for bot/model/native_layers.py."""
    out: torch.Tensor = _required().rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps)
    return out.view(x.shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of bfloat16 x [..., 2F] = (gate, up), F a multiple of 16 -> [..., F]."""
    out: torch.Tensor = _required().swiglu(x.reshape(-1, x.shape[-1]).contiguous())
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


def rope_cache_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    rope: torch.Tensor,
    heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """In place on contiguous bfloat16 qkv [N, (H + 2G) * D]: RoPE on each query and key head (``rope``
    [T, P, 2] the (cos, sin) table), then token i's keys and values go to slot ``positions[i]`` of
    cache row ``rows[i]`` (caches [R, G, T, D])."""
    _required().rope_cache_write(qkv, positions, rows, rope, heads, k_cache, v_cache)


@dataclass(frozen=True, eq=False)
class DecodeLayer:
    """One transformer layer's tensors for ``make_decode_step``: bfloat16 norm weights, the layer's
    caches [R, G, T, D], and its qkv, dense, h_to_4h and 4h_to_h weights with their float32 biases."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    linears: tuple[tuple[PackedInt4, torch.Tensor | None], ...]


class DecodeStep(Protocol):
    def run(self, x: torch.Tensor, positions: torch.Tensor, first_row: int) -> torch.Tensor: ...


def make_decode_step(layers: list[DecodeLayer], rope: torch.Tensor, heads: int, eps: float) -> DecodeStep:
    """The compiled decode step over ``layers`` (decode_step.cpp; the caller checked ``attention_fits``).
    Its ``run(x [B, C], positions [B], first_row)`` gives what the layers' native modules give, bit for
    bit, in one call."""
    module = _required()
    empty = torch.empty(0)
    tensors, outs = [], []
    for layer in layers:
        if len(layer.linears) != 4:
            raise ValueError(
                f"a layer has 4 linears (qkv, dense, h_to_4h, 4h_to_h), got {len(layer.linears)}"
            )
        flat = [layer.input_norm, layer.post_norm, layer.k_cache, layer.v_cache]
        for weight, bias in layer.linears:
            flat += [weight.packed, weight.scale, empty if bias is None else bias]
        tensors.append(flat)
        outs.append([weight.out_features for weight, _ in layer.linears])
    step: DecodeStep = module.DecodeStep(tensors, outs, rope, heads, eps)
    return step


def reference_linear(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exact float32 result ``x @ (q * scale).T + bias`` for x [N, in], a chunk of rows at a time."""
    xf = x.to(torch.float32)
    y = torch.cat(
        [
            xf @ w.dequantize(start, min(start + _CHUNK_ROWS, w.out_features)).T
            for start in range(0, w.out_features, _CHUNK_ROWS)
        ],
        dim=1,
    )
    return y if bias is None else y + bias.to(torch.float32)
