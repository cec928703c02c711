"""The inference thread's intra-op thread count when the setting says 0 (auto).

Measured on a 2-core AVX512 machine (full-size ChatGLM2-6B-INT4 with random weights, VNNI kernel;
median ms per decoded token over 20 tokens, repeated): with the bot's kind of work beside it (an
asyncio loop doing ~50 sqlite writes + reads and 2 KB JSON encodes a second, ~4 % of a core, run as
another process or as a thread of the same process), 2 threads took 110-127 ms and 1 thread
129-141 ms: light event-loop work does not spoil two threads. A busy neighbour does (the
oversubscription collapse): with another process spinning on a core, 2 threads took 0.45-1.9 s per
token and 1 thread 250-290 ms. So the default uses every usable core on small machines and leaves
one for the event loop and the database on larger ones; a box shared with CPU-heavy processes
should set ``BOT_NUM_THREADS=1``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" else None
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """Intra-op threads for the inference thread: all usable cores up to 2, else all but one."""
    cores = usable_cores()
    return cores if cores <= 2 else cores - 1
