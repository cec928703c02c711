"""float32 reproduces the official greedy answers through every path: the batch engine with requests
decoding together, prefix KV reuse and the model service (generate and the CLI: test_sampling.py,
test_cli.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import pytest

from bot.generation import GenerationParams, GenerationRequest
from bot.model.engine import ChatGLM2Generator, ChatState
from bot.service import ModelService
from tests.model.fixture import expected, tiny_dir

Kind = Literal["fp32", "int4"]
GREEDY_8 = GenerationParams(max_new_tokens=8, temperature=0.0)


def cases(kind: Kind) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = expected()[kind]
    return runs


def official_request(case: dict[str, Any], conversation: str = "") -> GenerationRequest:
    prompt = next(p for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == case["name"])
    history = tuple((query, answer) for query, answer in prompt["history"])
    return GenerationRequest(
        query=prompt["query"], history=history, params=GREEDY_8, conversation=conversation
    )


def load(kind: Kind, **kwargs: Any) -> ChatGLM2Generator:
    return ChatGLM2Generator.load(tiny_dir(kind), dtype="float32", device="cpu", **kwargs)


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_requests_decoding_together_give_the_official_answers(kind: Kind) -> None:
    generator = load(kind, max_batch_size=3)
    runs = cases(kind)
    states = [generator.begin(official_request(case), lambda _d: None, lambda: False) for case in runs]
    while not all(state.done for state in states):
        generator.step(states)
    for case, state in zip(runs, states, strict=True):
        assert isinstance(state, ChatState)
        assert state.prompt_ids == next(
            p["input_ids"] for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == case["name"]
        )
        assert state.tokens == case["greedy_8_no_eos_stop_ids"], case["name"]
        assert generator.finish(state).text == case["chat_response_greedy_8"], case["name"]


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_a_turn_on_reused_prefix_kv_gives_the_official_answer(kind: Kind) -> None:
    generator = load(kind, max_batch_size=2)
    case = next(case for case in cases(kind) if case["name"] == "multi_turn")
    request = official_request(case, conversation="c")
    (first_turn, (second_query, _)) = request.history
    earlier = GenerationRequest(query=second_query, history=(first_turn,), params=GREEDY_8, conversation="c")
    kept = generator.begin(earlier, lambda _d: None, lambda: False)  # its prompt starts this turn's
    while not kept.done:
        generator.step([kept])
    generator.finish(kept)
    while generator.idle_step():  # the answer and the next round's header go into the kept KV
        pass
    state = generator.begin(request, lambda _d: None, lambda: False)
    assert state.reused >= len(kept.prompt_ids) - 1
    while not state.done:
        generator.step([state])
    assert state.tokens == case["greedy_8_no_eos_stop_ids"]
    assert generator.finish(state).text == case["chat_response_greedy_8"]


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_the_model_service_streams_the_official_answers(kind: Kind) -> None:
    async def serve() -> list[str]:
        service = ModelService(lambda: load(kind, max_batch_size=3), queue_size=8, timeout_s=120)
        await service.start()
        try:

            async def answer(request: GenerationRequest) -> str:
                stream = service.stream(request)
                deltas = [delta async for delta in stream]
                assert stream.result is not None and stream.result.text == "".join(deltas)
                return stream.result.text

            return await asyncio.gather(*(answer(official_request(case)) for case in cases(kind)))
        finally:
            await service.close()

    assert asyncio.run(serve()) == [case["chat_response_greedy_8"] for case in cases(kind)]
