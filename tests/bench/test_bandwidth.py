"""bench/bandwidth.py on a small buffer."""

from __future__ import annotations

import json

import pytest
import torch

from bench.bandwidth import main, measure_read_bandwidth


def test_measure_read_bandwidth_is_positive_and_restores_threads() -> None:
    threads = torch.get_num_threads()
    gbps = measure_read_bandwidth(seconds=0.05, threads=1, size_mb=16)
    assert 0.1 < gbps < 10_000
    assert torch.get_num_threads() == threads


def test_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seconds", "0.05", "--size-mb", "8", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 1 and result["size_mb"] == 8
    assert result["read_gb_per_s"] > 0


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        measure_read_bandwidth(seconds=0)
