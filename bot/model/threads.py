"""The inference thread's intra-op thread count when the setting says 0 (auto).

Light event-loop work beside the inference thread does not spoil two threads; a busy neighbour does
(the oversubscription collapse; measurements in bot/model/README.md). So the default uses every usable
core on small machines and leaves one for the event loop and the database on larger ones; a box
shared with CPU-heavy processes should set ``BOT_NUM_THREADS=1``.
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
