"""``OpenAIService`` against a scripted fake server: streaming, retries, timeouts, bad streams, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import openai_backend
from bot.config import ConfigError
from bot.generation import GenerationParams, GenerationRequest
from bot.openai_backend import BackendUnavailable, OpenAIService
from bot.service import GenerationCancelled, GenerationFailed, GenerationTimeout, ServiceBusy, TextStream
from tests.backend.fake_openai import ANSWER, FakeOpenAI
from tests.model.fixture import tiny_dir
from tests.support import make_settings

REQUEST = GenerationRequest(
    query="and now?",
    history=(("hi", "hello"),),
    params=GenerationParams(max_new_tokens=20, temperature=0.5, seed=3),
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_backend, "BACKOFF_FIRST_S", 0.01)


async def service_for(tmp_path: Path, base_url: str, **overrides: Any) -> OpenAIService:
    values: dict[str, Any] = {
        "backend": "openai",
        "openai_base_url": base_url,
        "openai_model": "fake-model",
        "openai_api_key": "backend-key",
        "model_path": "",
        "request_timeout_s": 10,
    }
    values.update(overrides)
    service = OpenAIService(make_settings(tmp_path, **values))
    await service.start()
    return service


async def collect(stream: TextStream) -> list[str]:
    return [delta async for delta in stream]


async def test_streams_the_answer_with_the_servers_usage(tmp_path: Path, fake: FakeOpenAI) -> None:
    service = await service_for(tmp_path, fake.base_url)
    try:
        stream = service.stream(REQUEST)
        deltas = await collect(stream)
    finally:
        await service.close()
    assert "".join(deltas) == ANSWER and len(deltas) > 3
    assert stream.result is not None and stream.result.text == ANSWER
    assert stream.result.prompt_tokens == 11 and stream.result.new_tokens == len(ANSWER.split())
    assert stream.result.hit_limit  # the fake ends with finish_reason "length"
    body = fake.requests[0]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (20, 0.5, 3)
    assert fake.headers[0]["Authorization"] == "Bearer backend-key"


async def test_429_and_500_are_retried_before_the_first_token(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.plan = ["429", "500"]
    fake.retry_after = "0.3"
    service = await service_for(tmp_path, fake.base_url)
    started = time.monotonic()
    try:
        assert "".join(await collect(service.stream(REQUEST))) == ANSWER
    finally:
        await service.close()
    assert len(fake.requests) == 3
    assert time.monotonic() - started >= 0.6  # Retry-After honoured twice


async def test_a_server_that_stays_down_is_a_clear_error(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.default = "500"
    service = await service_for(tmp_path, fake.base_url)
    try:
        with pytest.raises(BackendUnavailable, match="not answering"):
            await collect(service.stream(REQUEST))
    finally:
        await service.close()
    assert len(fake.requests) == openai_backend.ATTEMPTS


async def test_a_server_that_stays_busy_is_service_busy(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.default = "429"
    service = await service_for(tmp_path, fake.base_url)
    try:
        with pytest.raises(ServiceBusy):
            await collect(service.stream(REQUEST))
    finally:
        await service.close()


async def test_nothing_listening_is_a_clear_error_not_a_hang(tmp_path: Path, fake: FakeOpenAI) -> None:
    url = fake.base_url
    await fake.close()  # the port is free now: connections are refused
    service = await service_for(tmp_path, url)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(BackendUnavailable):
                await collect(service.stream(REQUEST))
    finally:
        await service.close()


async def test_a_stalled_stream_times_out_and_is_closed(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.default = "stall"
    service = await service_for(tmp_path, fake.base_url, request_timeout_s=0.5)
    try:
        with pytest.raises(GenerationTimeout):
            await collect(service.stream(REQUEST))
        async with asyncio.timeout(5):
            await fake.disconnected.wait()
    finally:
        await service.close()


async def test_a_drop_mid_answer_is_generation_failed(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.default = "disconnect"
    service = await service_for(tmp_path, fake.base_url)
    deltas: list[str] = []
    try:
        with pytest.raises(GenerationFailed):
            async for delta in service.stream(REQUEST):
                deltas.append(delta)
    finally:
        await service.close()
    assert "".join(deltas) == "Hello there,"
    assert len(fake.requests) == 1  # text had streamed: no retry


@pytest.mark.parametrize("behaviour", ["malformed", "error_event"])
async def test_a_malformed_chunk_is_generation_failed_and_the_service_goes_on(
    tmp_path: Path, fake: FakeOpenAI, behaviour: str
) -> None:
    fake.plan = [behaviour]
    service = await service_for(tmp_path, fake.base_url)
    try:
        with pytest.raises(GenerationFailed):
            await collect(service.stream(REQUEST))
        assert "".join(await collect(service.stream(REQUEST))) == ANSWER
        assert service.in_flight == 0 and service.queue_depth == 0
    finally:
        await service.close()


async def test_cancel_closes_the_http_stream(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.default = "stall"
    service = await service_for(tmp_path, fake.base_url)
    try:
        stream = service.stream(REQUEST)
        for _ in range(100):  # until the server holds the request
            if fake.requests:
                break
            await asyncio.sleep(0.02)
        stream.cancel()
        with pytest.raises(GenerationCancelled):
            await collect(stream)
        async with asyncio.timeout(5):
            await fake.disconnected.wait()
        assert service.in_flight == 0
    finally:
        await service.close()


async def test_concurrency_and_queue_are_bounded(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.default = "stall"
    service = await service_for(tmp_path, fake.base_url, openai_concurrency=1, queue_size=1)
    try:
        first = service.stream(REQUEST)
        second = service.stream(REQUEST)
        await asyncio.sleep(0.2)
        assert (service.in_flight, service.queue_depth) == (1, 1) and len(fake.requests) == 1
        with pytest.raises(ServiceBusy):
            service.stream(REQUEST)
        first.cancel()
        second.cancel()
    finally:
        await service.close()


async def test_token_counts_use_the_tokenizer_when_there_is_one(tmp_path: Path, fake: FakeOpenAI) -> None:
    estimated = await service_for(tmp_path, fake.base_url)
    counted = await service_for(tmp_path, fake.base_url, model_path=str(tiny_dir("fp32")))
    try:
        assert estimated.count_tokens("abcdef") == 2 and estimated.count_tokens("天气") == 2
        assert estimated.prompt_tokens("hi", ()) > estimated.count_tokens("hi")
        from bot.model.tokenizer import ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer.from_file(tiny_dir("fp32"))
        assert counted.count_tokens("hello world") == len(
            tokenizer.encode("hello world", add_special_tokens=False)
        )
        assert counted.prompt_tokens("hi", (("a", "b"),)) == len(
            tokenizer.build_chat_input("hi", (("a", "b"),))
        )
    finally:
        await estimated.close()
        await counted.close()


async def test_an_unreadable_tokenizer_is_a_config_error(tmp_path: Path, fake: FakeOpenAI) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="BOT_MODEL_PATH"):
        await service_for(tmp_path, fake.base_url, model_path=str(tmp_path))
