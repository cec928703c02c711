"""The loaded model is visible in /metrics: what runs (info) and what the prefix cache holds."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from bot import app
from bot.model.engine import ChatGLM2Generator
from tests.model.fixture import tiny_dir
from tests.support import make_settings


def test_model_info_and_prefix_cache_gauges(tmp_path: Path) -> None:
    generator = ChatGLM2Generator.load(tiny_dir("int4"), dtype="float32", device="cpu", int4_kernel="torch")
    settings = make_settings(tmp_path, model_path=str(tiny_dir("int4")))
    app._export_model_metrics(settings, generator)
    scraped = generate_latest().decode()
    assert 'chatglm_bot_model_info{device="cpu",dtype="float32",kernel="' in scraped
    assert f'model="{tiny_dir("int4")}"' in scraped
    assert "chatglm_bot_prefix_cache_entries 0.0" in scraped
    assert "chatglm_bot_prefix_cache_bytes 0.0" in scraped
