"""What the benchmarks share: where their checkpoints live, and the peak-memory probe."""

from __future__ import annotations

import resource
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_CACHE = Path.home() / ".cache" / "chatglm-bot" / "bench"  # make_checkpoint.py's folders
DEFAULT_MODEL = BENCH_CACHE / "int4"  # the full-size random int4 checkpoint
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "chatglm2"  # the tiny golden checkpoints

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM), so that a run inside
    another benchmark's process does not report the memory of what ran before it; False where it cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gb() -> float:
    """Peak resident memory since the last ``reset_peak_rss`` (VmHWM), else since the process began."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
