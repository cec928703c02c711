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
        assert decode.main([*argv, "--bandwidth-mb", "16", "--bandwidth-seconds", "0.1"]) == 0
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
