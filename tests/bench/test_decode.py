"""bench/decode.py runs end to end (on the tiny int4 fixture) and reports every field."""

from __future__ import annotations

import json

import pytest
import torch

from bench import decode
from tests.model.fixture import tiny_dir


def test_decode_bench_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", str(tiny_dir("int4")), "--threads", "1", "--prompt-tokens", "16", "--new-tokens", "4"]
    threads = torch.get_num_threads()
    try:
        assert (
            decode.main(
                [*argv, "--bandwidth-mb", "16", "--bandwidth-seconds", "0.1", "--no-chat", "--no-peers"]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["prompt_tokens"] == 16 and report["new_tokens"] == 4
    for key in (
        "load_s",
        "peak_rss_gb",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "read_bandwidth_gb_per_s",
    ):
        assert report[key] > 0, key
    ratio = report["decode_tokens_per_s"] / report["roofline_tokens_per_s"]
    assert 0 < report["ratio_to_roofline"] == pytest.approx(ratio, rel=0.02, abs=1e-4)


def test_decode_bench_measures_turns_and_concurrency_through_the_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--model", str(tiny_dir("int4")), "--threads", "1", "--prompt-tokens", "16", "--new-tokens", "4"]
    argv += ["--bandwidth-mb", "16", "--bandwidth-seconds", "0.1", "--turns", "3", "--concurrency", "1", "8"]
    argv += ["--query-tokens", "12", "--answer-tokens", "8", "--decode-tokens", "6", "--no-peers"]
    threads = torch.get_num_threads()
    try:
        assert decode.main([*argv, "--memory-conversations", "4", "--prefix-cache-mb", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    chat = report["chat"]
    assert set(chat["ttft_s"]) == {"turn1", "turn3", "turn3_full_prefill"}
    assert (
        chat["prefill"]["turn3"]["reused_tokens"]
        > 0
        == chat["prefill"]["turn3_full_prefill"]["reused_tokens"]
    )
    assert set(chat["decode_tokens_per_s"]) == {"1", "8"} and chat["decode_tokens_per_s"]["8"] > 0
    assert chat["memory"]["conversations"] == 4
    assert chat["memory"]["prefix_cache_peak_mb"] <= chat["memory"]["prefix_cache_limit_mb"] == 1
    speedup = chat["decode_speedup_vs_1"]["8"]
    assert report["targets_met"]["8_concurrent>=4.0x_1"] == (speedup >= 4.0)
    assert report["targets_met"]["turn3_ttft<=1.3x_turn1"] == (chat["ttft_ratio_turn_last_to_1"] <= 1.3)
    assert set(report["peers"]) == {"chatglm-cpp", "llama-cpp-python"}
    assert (
        report["peers"]["llama-cpp-python"] == "skipped (--no-peers)" and "ratio_to_llama_cpp" not in report
    )
