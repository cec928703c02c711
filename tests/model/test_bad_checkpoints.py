"""``python -m bot generate`` on broken checkpoint folders: one line naming the file, exit code 2."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.model.fixture import REPO_ROOT, tiny_dir


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


def edit_config(**fields: object) -> Callable[[Path], str]:
    def edit(folder: Path) -> str:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return "config.json"

    return edit


def bad_json(folder: Path) -> str:
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    return "config.json"


def no_tokenizer(folder: Path) -> str:
    (folder / "tokenizer.model").unlink()
    return "tokenizer.model"


def truncated_weights(folder: Path) -> str:
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    return "pytorch_model.bin"


def malicious_pickle(folder: Path) -> str:
    torch.save({"x": Exploit()}, folder / "pytorch_model.bin")
    return "pytorch_model.bin"


def legacy_pickle(folder: Path) -> str:
    with (folder / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"x": Exploit()}, f)
    return "pytorch_model.bin"


CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "zero groups": (edit_config(multi_query_group_num=0), "multi_query_group_num must be a positive integer"),
    "groups do not divide heads": (edit_config(multi_query_group_num=3), "must be a multiple of"),
    "string quantization_bit": (edit_config(quantization_bit="4"), "got '4'"),
    "float layers": (edit_config(num_layers=2.5), "num_layers must be a positive integer"),
    "string hidden_size": (edit_config(hidden_size="64"), "hidden_size must be a positive integer"),
    "eos outside the vocabulary": (edit_config(eos_token_id=640), "eos_token_id must be an integer in"),
    "bool flag as a string": (edit_config(add_qkv_bias="yes"), "add_qkv_bias must be true or false"),
    "bad json": (bad_json, "cannot read"),
    "no tokenizer": (no_tokenizer, "not found"),
    "truncated weights": (truncated_weights, "truncated or not a checkpoint"),
    "malicious pickle": (malicious_pickle, "refused"),
    "legacy pickle": (legacy_pickle, "cannot read weights"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_one_line_and_exit_code_2(case: str, tmp_path: Path) -> None:
    breaker, problem = CASES[case]
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("fp32"), folder)
    name = breaker(folder)
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "generate", "--model", str(folder), "--max-new-tokens", "1", "hi"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(folder / name) in lines[0] and problem in lines[0]
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    assert "code ran" not in proc.stdout
