"""``chatglm-bot generate``: --json contract, streaming, history file validation, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

import pytest

from bot.model import cli
from tests.model.fixture import expected, tiny_dir


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return cli.run(parser.parse_args(list(argv)))


def case(kind: str, name: str) -> dict[str, Any]:
    return next(c for c in expected()[kind] if c["name"] == name)


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_json_output(
    kind: Literal["fp32", "int4"], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = next(p for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == "multi_turn")
    history = tmp_path / "history.json"
    history.write_text(json.dumps(prompt["history"], ensure_ascii=False), encoding="utf-8")
    args = ["--model", str(tiny_dir(kind)), "--greedy", "--max-new-tokens", "8", "--dtype", "float32"]
    assert run(*args, "--history", str(history), "--json", prompt["query"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"prompt_ids", "output_ids", "text", "logits_head", "timings"}
    assert set(report["timings"]) == {"load_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    want = case(kind, "multi_turn")
    assert report["prompt_ids"] == prompt["input_ids"]
    assert report["output_ids"] == want["greedy_8_no_eos_stop_ids"]
    assert report["text"] == want["chat_response_greedy_8"]
    head = want["last_logits"]["first16"]
    assert len(report["logits_head"]) == 16
    assert all(abs(a - b) < 1e-4 for a, b in zip(report["logits_head"], head, strict=True))
    assert all(v > 0 for v in report["timings"].values())


def test_streams_text(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", str(tiny_dir("fp32")), "--greedy", "--max-new-tokens", "8", "--dtype", "float32"]
    assert run(*args, "What is the capital of France?") == 0
    assert capsys.readouterr().out == case("fp32", "en_single")["chat_response_greedy_8"] + "\n"


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"q": "r"}), json.dumps([["only one"]]), json.dumps([["q", 3]]), "\udcff"],
)
def test_malformed_history_is_a_clear_error(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = tmp_path / "h.json"
    history.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert run("--model", str(tiny_dir("fp32")), "--history", str(history), "hi") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "history" in err


def test_missing_model_and_bad_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--model", str(tmp_path / "none"), "hi") == 2
    assert "not found" in capsys.readouterr().err
    assert run("--model", str(tiny_dir("fp32")), "--max-new-tokens", "0", "hi") == 2
    assert "max-new-tokens" in capsys.readouterr().err
