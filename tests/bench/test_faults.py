"""bench/faults.py end to end, small: 12 questions, 3 conversations, 2 restarts, random 5xx/429.

Only the report's shape and arithmetic are asserted: today's bot loses and duplicates answers
under kills (see the fault suite), so the counts themselves are what the benchmark measures."""

from __future__ import annotations

import json

import pytest

from bench import faults

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_fault_bench_reports_consistent_counts(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--messages", "12", "--conversations", "3", "--restarts", "2", "--seed", "7"]
    assert faults.main([*argv, "--settle-timeout", "15", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == list(faults.KEYS)
    assert report["questions"] == 12
    assert report["answered_once"] + report["duplicates"] + report["lost"] == report["questions"]
    counts = ("answered_once", "duplicates", "lost", "dangling_placeholders", "out_of_order")
    assert all(isinstance(report[key], int) and report[key] >= 0 for key in counts)
    assert report["out_of_order"] <= report["questions"]
    assert report["restarts"] == 2
    assert 0 <= report["p99_ack_s"] < report["elapsed_s"]


def test_percentile_is_the_nearest_rank() -> None:
    assert faults.percentile([], 0.99) == 0.0
    assert faults.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert faults.percentile([float(n) for n in range(1, 101)], 0.99) == 99.0
