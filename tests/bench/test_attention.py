"""bench/attention.py on small contexts."""

from __future__ import annotations

import json

import pytest

from bench import attention
from bot.model.kernels import build


def test_prints_both_paths_per_context_and_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--threads", "1", "--contexts", "16", "70", "--rows", "1", "3", "--repeats", "2"]
    assert attention.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["28_layers_ms"]) == {"16", "70"}
    for by_rows in report["28_layers_ms"].values():
        assert set(by_rows) == {"1", "3"}
        for timings in by_rows.values():
            assert timings["pytorch"] > 0
            assert ("compiled" in timings) == build.available()


def test_rejects_nonpositive_sizes() -> None:
    with pytest.raises(SystemExit):
        attention.main(["--contexts", "0"])
