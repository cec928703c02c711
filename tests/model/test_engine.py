"""ChatGLM2Generator: the official chat() responses, streaming, limits, the Generator protocol."""

from __future__ import annotations

import random

import pytest

from bot.generation import GenerationParams, GenerationRequest, Generator
from bot.model.engine import ChatGLM2Generator, ResponseStreamer
from bot.model.tokenizer import process_response
from tests.model.fixture import expected, tiny_dir

GREEDY8 = GenerationParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module", params=["fp32", "int4"])
def chat(request: pytest.FixtureRequest) -> tuple[str, ChatGLM2Generator]:
    return request.param, ChatGLM2Generator.load(tiny_dir(request.param), dtype="float32", device="cpu")


def request_for(case_name: str, params: GenerationParams = GREEDY8) -> GenerationRequest:
    prompt = next(p for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == case_name)
    history = tuple((q, r) for q, r in prompt["history"])
    return GenerationRequest(query=prompt["query"], history=history, params=params)


def test_responses_match_official_chat(chat: tuple[str, ChatGLM2Generator]) -> None:
    kind, generator = chat
    for case in expected()[kind]:
        deltas: list[str] = []
        result = generator.generate(request_for(case["name"]), deltas.append, lambda: False)
        assert result.text == case["chat_response_greedy_8"]
        assert "".join(deltas) == result.text
        assert result.new_tokens == 8 and not result.stopped
        prompt = next(p for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == case["name"])
        assert result.prompt_tokens == len(prompt["input_ids"])


def test_protocol_and_token_counts(chat: tuple[str, ChatGLM2Generator]) -> None:
    _, generator = chat
    assert isinstance(generator, ChatGLM2Generator)
    typed: Generator = generator  # structural check by mypy
    assert typed.max_context_tokens == 256  # tiny config seq_length (the 6B: 8192, official max_length)
    prompt = next(p for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == "multi_turn")
    history = [(q, r) for q, r in prompt["history"]]
    assert generator.prompt_tokens(prompt["query"], history) == len(prompt["input_ids"])
    assert generator.count_tokens("") == 0 and generator.count_tokens("What is the capital") > 0


def test_stop_and_sampling_seed(chat: tuple[str, ChatGLM2Generator]) -> None:
    _, generator = chat
    stopped = generator.generate(request_for("en_single"), lambda _d: None, lambda: True)
    assert stopped.stopped and stopped.new_tokens == 0 and stopped.text == ""
    params = GenerationParams(max_new_tokens=6, seed=42)
    texts = {
        generator.generate(request_for("zh_single", params), lambda _d: None, lambda: False).text
        for _ in range(2)
    }
    assert len(texts) == 1


def test_oversized_prompt_and_bad_params(chat: tuple[str, ChatGLM2Generator]) -> None:
    _, generator = chat
    with pytest.raises(ValueError, match="accepts 256"):
        generator.generate(GenerationRequest(query="天气 " * 300), lambda _d: None, lambda: False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate(
            GenerationRequest(query="hi", params=GenerationParams(max_new_tokens=0)),
            lambda _d: None,
            lambda: False,
        )


def test_response_streamer_deltas_add_up_to_processed_text() -> None:
    rng = random.Random(0)
    alphabet = [" ", "\n", "a", "训", "[[", "[[训练", "时间]]", "]", "[[训练时间]]", "好"]
    for _ in range(500):
        chunks = [rng.choice(alphabet) for _ in range(rng.randint(0, 8))]
        streamer = ResponseStreamer()
        out = [streamer.push(c) for c in chunks]
        out.append(streamer.finish())
        assert "".join(out) == process_response("".join(chunks)) == streamer.text, chunks


def test_response_streamer_holds_back_trailing_whitespace() -> None:
    streamer = ResponseStreamer()
    assert streamer.push("  hi") == "hi"
    assert streamer.push(" ") == ""
    assert streamer.push("there\n") == " there"
    assert streamer.push("[[训练") == ""
    assert streamer.finish() == "\n[[训练"
