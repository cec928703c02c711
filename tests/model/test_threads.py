"""Default intra-op thread count: usable cores from the affinity mask and the cgroup quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bot.model import threads


@pytest.mark.parametrize(("cores", "want"), [(1, 1), (2, 2), (3, 2), (8, 7)])
def test_default_uses_small_machines_fully_and_leaves_a_core_on_larger_ones(
    monkeypatch: pytest.MonkeyPatch, cores: int, want: int
) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    assert threads.default_threads() == want


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "want"),
    [
        ("max 100000", 4, 4),
        ("150000 100000", 4, 1),
        ("200000 100000", 8, 2),
        ("50000 100000", 2, 1),
        (None, 3, 3),
    ],
)
def test_usable_cores_honours_the_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpu_max: str | None, affinity: int, want: int
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(affinity)))
    assert threads.usable_cores() == want


def test_on_this_machine_the_default_is_positive_and_within_the_cores() -> None:
    assert 1 <= threads.default_threads() <= threads.usable_cores()
