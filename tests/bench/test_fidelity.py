"""bench/fidelity.py on the tiny fixtures: its JSON keys, and float32 against itself is exact."""

from __future__ import annotations

import json

import pytest
import torch

from bench import fidelity
from bot.model.kernels import build


def test_reports_every_mode_with_sane_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        assert fidelity.main(["--new-tokens", "3", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    assert report["reference"] == "float32" and report["new_tokens"] == 3
    assert set(report["checkpoints"]) == {"tiny-fp32", "tiny-int4"}
    for checkpoint in report["checkpoints"].values():
        assert checkpoint["positions"] == 3 * (3 + 1)  # 3 prompts: the prefill and 3 decode steps each
        modes = checkpoint["modes"]
        assert set(modes) == set(fidelity.MODES)
        exact = modes["float32"]
        assert exact["top1_agreement"] == 1.0 and exact["max_abs_logit_diff"] == 0.0
        assert exact["dtype"] == "float32"
        for name, mode in modes.items():
            if "unavailable" in mode:
                assert name == "w4a8" and not build.available()
                continue
            assert 0.0 <= mode["top1_agreement"] <= 1.0
            assert 0.0 <= mode["mean_abs_logit_diff"] <= mode["max_abs_logit_diff"]
            assert mode["reference_logit_spread"] > 0
        assert modes["bfloat16"]["dtype"] == "bfloat16" and modes["bfloat16"]["max_abs_logit_diff"] > 0
    auto = report["checkpoints"]["tiny-fp32"]["modes"]["auto"]
    assert auto["dtype"] == "float32" and auto["max_abs_logit_diff"] == 0.0  # a float32 checkpoint stays so
    if build.available():
        assert report["checkpoints"]["tiny-int4"]["modes"]["w4a8"]["int4_backend"] == "native"


def test_rejects_no_checkpoint_and_no_steps() -> None:
    with pytest.raises(SystemExit):
        fidelity.main(["--no-fixtures"])
    with pytest.raises(SystemExit):
        fidelity.main(["--new-tokens", "0"])
