"""``chatglm-bot build-kernel``: compile the native int4 kernel into its cache now, so no start does.

The same cache and key a later ``serve`` / ``chat`` / ``api`` uses (``XDG_CACHE_HOME``, this CPU, the
sources, torch and the compiler), built by bot/model/kernels/build.py. Loads no model weights. Exit 0
when the kernel is built or cannot be built here (no compiler, no ninja, no AVX2: the bot runs on
PyTorch's slower path, which is no failure), 1 when a build was tried and failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PROG = "chatglm-bot build-kernel"


def run(int4_kernel: str, out: Callable[[str], None] = print) -> int:
    if int4_kernel == "torch":
        out(f"{PROG}: BOT_INT4_KERNEL=torch runs PyTorch's int4 path: nothing to build")
        return 0
    from bot.model.kernels import build  # imports torch

    try:
        where = build.plan()
        if where.built:
            build.build_now(where)  # loads and self-tests it
            out(f"{PROG}: native int4 kernel for {where.isa} already built (cached at {where.directory})")
            return 0
        build.check_ninja()
    except build.Unbuildable as exc:
        out(f"{PROG}: not building the native int4 kernel ({exc}): the bot runs PyTorch's slower int4 path")
        return 0
    except build.Unavailable as exc:
        out(
            f"{PROG}: the cached native int4 kernel does not work ({exc}): the bot runs PyTorch's slower path"
        )
        return 1
    out(f"{PROG}: compiling the native int4 kernel for {where.isa} once; this takes a few minutes")
    started = time.monotonic()
    try:
        how = build.build_now(where)
    except build.Unavailable as exc:
        reason = " ".join(str(exc).split())  # one line, whatever the compiler printed
        out(f"{PROG}: the build failed ({reason}); the bot runs PyTorch's slower int4 path")
        return 1
    seconds = time.monotonic() - started
    if how.startswith("built by another process"):
        out(f"{PROG}: built by another process meanwhile, cached at {where.directory}")
    else:
        out(f"{PROG}: built in {seconds:.0f} s, cached at {where.directory}")
    return 0
