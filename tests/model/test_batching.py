"""Batched decoding: rows at different positions decode together with the same output as alone."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import pytest
import torch

from bot.generation import BatchGenerator, DecodeState, GenerationParams, GenerationRequest
from bot.model.engine import ChatGLM2Generator, ChatState
from bot.service import ModelService
from tests.model.fixture import tiny_dir

QUERIES = ("What is the capital of France?", "你好", "tell me a story about cats", "天气怎么样")


def greedy(n: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0)


@pytest.fixture(
    scope="module",
    params=[("fp32", "float32"), ("int4", "float32"), ("int4", "bfloat16")],  # bf16: the int4 kernels
    ids=["fp32", "int4", "int4-bf16"],
)
def generator(request: pytest.FixtureRequest) -> ChatGLM2Generator:
    kind, dtype = request.param
    return ChatGLM2Generator.load(tiny_dir(kind), dtype=dtype, device="cpu", max_batch_size=4)


@pytest.fixture(autouse=True)
def no_shared_prefixes(generator: ChatGLM2Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests compare batched decoding with running alone: a request without a conversation key
    must not reuse an earlier one's KV here (bfloat16 split prefills may differ in the last bit; that
    reuse is tested in test_prefix_cache.py)."""
    monkeypatch.setattr(generator.prefix_cache, "longest_match", lambda ids: None)


def requests() -> list[GenerationRequest]:
    sampled = GenerationParams(max_new_tokens=9, temperature=0.8, top_p=0.8, top_k=50, seed=7)
    return [
        GenerationRequest(query=QUERIES[0], params=greedy(12)),
        GenerationRequest(query=QUERIES[1], history=(("hi", "hello there"),), params=greedy(5)),
        GenerationRequest(query=QUERIES[2], params=sampled),  # its own seeded sampler
        GenerationRequest(query=QUERIES[3], params=greedy(10)),
    ]


def alone(generator: ChatGLM2Generator, request: GenerationRequest) -> tuple[list[int], str]:
    run = generator.run(request, lambda _d: None, lambda: False)
    return run.output.tokens, run.text


def test_protocol(generator: ChatGLM2Generator) -> None:
    assert isinstance(generator, BatchGenerator)
    assert generator.max_batch_size == 4


def test_joining_at_different_steps_matches_running_alone(generator: ChatGLM2Generator) -> None:
    want = [alone(generator, r) for r in requests()]
    joins = {0: [0], 2: [1, 2], 5: [3]}  # step -> requests that begin before it
    texts: dict[int, list[str]] = {i: [] for i in range(4)}
    states: dict[int, ChatState] = {}
    results = {}
    step = 0
    while step in joins or any(not s.done for s in states.values()):
        for i in joins.get(step, []):
            states[i] = generator.begin(requests()[i], texts[i].append, lambda: False)
        running: list[DecodeState] = [s for s in states.values() if not s.done]
        generator.step(running)
        for i, state in states.items():
            if state.done and i not in results:
                results[i] = generator.finish(state)
        step += 1
    for i, (tokens, text) in enumerate(want):
        assert states[i].tokens == tokens, i
        assert results[i].text == text == "".join(texts[i])
        assert results[i].new_tokens == len(tokens)
    # rows are handed back: all four can begin again
    again = [generator.begin(r, lambda _d: None, lambda: False) for r in requests()]
    assert sorted(s.row for s in again) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="in use"):
        generator.begin(requests()[0], lambda _d: None, lambda: False)
    for state in again:
        generator.finish(state)


def test_stop_and_context_limit_per_row(generator: ChatGLM2Generator) -> None:
    long_query = "天气 " * 75  # close to the tiny model's 256-token context
    capped = GenerationRequest(query=long_query, params=greedy(200))
    want_capped = alone(generator, capped)
    want_other = alone(generator, requests()[0])
    stop_after = 3
    stopper = generator.begin(requests()[3], lambda _d: None, lambda: len(stopper.tokens) >= stop_after)
    limited = generator.begin(capped, lambda _d: None, lambda: False)
    other = generator.begin(requests()[0], lambda _d: None, lambda: False)
    states = [stopper, limited, other]
    while any(not s.done for s in states):
        generator.step([s for s in states if not s.done])
    results = [generator.finish(s) for s in states]
    assert results[0].stopped and len(stopper.tokens) == stop_after
    assert len(limited.prompt_ids) + len(limited.tokens) == generator.max_context_tokens
    assert (limited.tokens, results[1].text) == want_capped
    assert (other.tokens, results[2].text) == want_other
    with pytest.raises(ValueError, match="not a running state"):
        generator.finish(stopper)


async def test_concurrent_requests_through_model_service(generator: ChatGLM2Generator) -> None:
    want = [alone(generator, r)[1] for r in requests()]
    sizes: list[int] = []
    step = generator.step

    def slow_step(states: Sequence[DecodeState]) -> None:
        sizes.append(len(states))
        time.sleep(0.005)  # leaves the event loop time to submit the next request mid-decode
        step(states)

    generator.step = slow_step  # type: ignore[method-assign]
    service = ModelService(lambda: generator, queue_size=8, timeout_s=30)
    await service.start()
    try:
        streams = []
        for request in requests():
            stream = service.stream(request)
            streams.append((stream, aiter(stream)))
            await anext(streams[-1][1])  # the next request joins a batch that is decoding
        texts = []
        for stream, rest in streams:
            async for _ in rest:
                pass
            assert stream.result is not None
            texts.append(stream.result.text)
    finally:
        await service.close()
        del generator.step
    assert texts == want
    assert max(sizes) >= 3
    assert generator.in_use_rows == 0


@pytest.fixture
def chunk(generator: ChatGLM2Generator) -> Iterator[int]:
    """A small prefill chunk for the test, restored afterwards."""
    before = generator.prefill_chunk_tokens
    generator.prefill_chunk_tokens = 8
    yield 8
    generator.prefill_chunk_tokens = before


def test_chunked_prefill_gives_the_one_pass_output(generator: ChatGLM2Generator, chunk: int) -> None:
    long_request = GenerationRequest(query="tell me a story about cats " * 6, params=greedy(12))
    chunked = [alone(generator, r) for r in (*requests(), long_request)]
    generator.prefill_chunk_tokens = 10_000
    assert [alone(generator, r) for r in (*requests(), long_request)] == chunked


def test_a_long_prefill_pauses_other_streams_one_chunk_at_a_time(
    generator: ChatGLM2Generator, chunk: int
) -> None:
    long_request = GenerationRequest(query="天气 " * 20, params=greedy(6))
    going = GenerationRequest(query=QUERIES[0], params=greedy(30))
    want = [alone(generator, r) for r in (going, long_request)]
    first = generator.begin(going, lambda _d: None, lambda: False)
    while first.prefilling or not first.tokens:
        generator.step([first])
    second = generator.begin(long_request, lambda _d: None, lambda: False)
    chunks = -(-len(second.prompt_ids) // chunk)
    assert second.prefilled == chunk and chunks >= 4
    for done_chunks in range(2, chunks + 1):
        tokens = len(first.tokens)
        generator.step([first, second])
        assert len(first.tokens) == tokens + 1  # the first stream went on during the prefill
        assert second.prefilled == min(done_chunks * chunk, len(second.prompt_ids)) and not second.tokens
    assert not second.prefilling
    states = [first, second]
    while any(not s.done for s in states):
        generator.step([s for s in states if not s.done])
    results = [generator.finish(s) for s in states]
    assert [(s.tokens, r.text) for s, r in zip(states, results, strict=True)] == want


def test_stopping_during_prefill_frees_the_row_and_keeps_the_prefilled_kv(
    generator: ChatGLM2Generator, chunk: int
) -> None:
    stop = False
    request = GenerationRequest(query="天气 " * 40, params=greedy(6), conversation="stopped-early")
    state = generator.begin(request, lambda _d: None, lambda: stop)
    generator.step([state])
    stop = True
    generator.step([state])
    assert state.done and state.stopped and not state.tokens and state.prefilled == 2 * chunk
    result = generator.finish(state)
    assert result.stopped and result.new_tokens == 0 and result.text == ""
    assert generator.in_use_rows == 0
    kept = generator.prefix_cache.take("stopped-early")
    assert kept is not None and kept.ids == tuple(state.prompt_ids[: 2 * chunk])


def test_a_failing_prefill_chunk_ends_only_its_request(
    generator: ChatGLM2Generator, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = alone(generator, requests()[0])
    first = generator.begin(requests()[0], lambda _d: None, lambda: False)
    broken = generator.begin(
        GenerationRequest(query="天气 " * 40, params=greedy(6)), lambda _d: None, lambda: False
    )
    prefill = generator._prefill

    def failing(row: int, ids: Sequence[int], start: int) -> torch.Tensor:
        if row == broken.row:
            raise RuntimeError("out of memory")
        return prefill(row, ids, start)

    monkeypatch.setattr(generator, "_prefill", failing)
    states = [first, broken]
    while any(not s.done for s in states):
        generator.step([s for s in states if not s.done])
    assert broken.error is not None and not broken.tokens
    with pytest.raises(RuntimeError, match="out of memory"):
        generator.finish(broken)
    assert (first.tokens, generator.finish(first).text) == want
    assert generator.in_use_rows == 0
