"""bench/chat.py runs end to end through the ModelService on the tiny int4 fixture."""

from __future__ import annotations

import json

import pytest

from bench import chat, common
from tests.model.fixture import tiny_dir


def test_chat_bench_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", str(tiny_dir("int4")), "--threads", "1", "--turns", "3", "--query-tokens", "12"]
    argv += ["--answer-tokens", "8", "--decode-tokens", "6", "--concurrency", "1", "2"]
    assert chat.main([*argv, "--memory-conversations", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["ttft_s"]) == {"turn1", "turn3", "turn3_full_prefill"}
    assert all(v > 0 for v in report["ttft_s"].values())
    assert report["idle_extension_s"] >= 0
    assert set(report["decode_tokens_per_s"]) == {"1", "2"} and report["decode_tokens_per_s"]["2"] > 0
    assert report["peak_rss_gb"] > 0 and report["kv_copy_ms_per_1k_tokens"] > 0
    assert report["peak_rss_scope"] in ("this run", "the whole process")
    assert report["memory"]["prefix_cache_entries"] >= 3
    assert report["memory"]["prefix_cache_peak_mb"] <= report["memory"]["prefix_cache_limit_mb"]


def test_peak_rss_can_start_a_new_window() -> None:
    block = bytearray(400 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    with_block = common.peak_rss_gb()
    del block
    if not common.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    assert common.peak_rss_gb() < with_block - 0.3
