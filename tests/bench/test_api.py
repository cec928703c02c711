"""bench/api.py runs end to end: a real chatglm-bot api subprocess and the in-process service, tiny int4."""

from __future__ import annotations

import json

import pytest

from bench import api
from tests.model.fixture import tiny_dir


def test_api_bench_reports_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", str(tiny_dir("int4")), "--threads", "1", "--clients", "2", "--turns", "2"]
    assert api.main([*argv, "--query-tokens", "8", "--answer-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for side in ("api", "in_process"):
        assert report[side]["requests"] == 4
        assert 0 < report[side]["ttft_s"]["p50"] <= report[side]["ttft_s"]["p99"]
        assert report[side]["tokens_per_s"] > 0
    assert report["api"]["url"].startswith("http://127.0.0.1:")
    assert report["api_vs_in_process"]["ttft_p50_ratio"] > 0


def test_percentiles() -> None:
    assert api.percentiles([float(v) for v in range(1, 101)]) == {"p50": 50.5, "p99": 99.0}
