"""Paths and expected values of the tiny ChatGLM2 golden fixture (see tests/fixtures/chatglm2/README.txt).

Shared by the model tests: ``tiny_dir("fp32")`` / ``tiny_dir("int4")`` are checkpoint folders,
``expected()`` is expected.json, and the real ChatGLM2-6B tokenizer (not in this repository) is
looked up in ``$BOT_TEST_SHARED_DIR/fixtures/chatglm2/real-tokenizer/`` (default: ``../shared`` beside
the checkout; set it where the checkout is a worktree elsewhere).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pytest

from bot.model.kernels import build

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "chatglm2"
# CI has a compiler: there, a native kernel that does not build or load fails its tests instead of skipping.
REQUIRE_KERNEL = os.environ.get("BOT_TEST_REQUIRE_KERNEL") == "1"
SHARED_DIR = Path(os.environ.get("BOT_TEST_SHARED_DIR") or REPO_ROOT.parent / "shared")
REAL_TOKENIZER = SHARED_DIR / "fixtures" / "chatglm2" / "real-tokenizer" / "tokenizer.model"


def tiny_dir(kind: Literal["fp32", "int4"]) -> Path:
    return FIXTURE_DIR / f"chatglm2-tiny-{kind}"


@cache
def expected() -> dict[str, Any]:
    values: dict[str, Any] = json.loads((FIXTURE_DIR / "expected.json").read_text(encoding="utf-8"))
    return values


@cache
def expected_real_tokenizer() -> dict[str, Any]:
    path = FIXTURE_DIR / "expected_real_tokenizer.json"
    values: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return values


def require_native_kernel() -> None:
    """Skip the calling test where the native kernel is unavailable (no compiler, a failed build, an
    unsupported CPU), with the reason; under BOT_TEST_REQUIRE_KERNEL=1 fail it instead."""
    if build.available():
        return
    reason = f"native kernel unavailable here: {build.backend_name()}"
    if REQUIRE_KERNEL:
        pytest.fail(f"{reason}; BOT_TEST_REQUIRE_KERNEL=1 requires it", pytrace=False)
    pytest.skip(reason)


def real_tokenizer_path() -> Path:
    """The real tokenizer.model, or skip the calling test with the reason."""
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"real ChatGLM2-6B tokenizer.model not found at {REAL_TOKENIZER}")
    return REAL_TOKENIZER
