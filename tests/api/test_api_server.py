"""``chatglm-bot api`` end to end: a real subprocess on the tiny checkpoint, the official openai client."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.api.server import API_KEY, ApiProcess, api_server, post_json, request, tiny_env
from tests.model.fixture import expected, tiny_dir
from tests.test_e2e_cli import run_cli

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8}
MULTI = next(p for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == "multi_turn")


def generate(query: str, history: list[list[str]], tmp_path: Path, max_new_tokens: int = 8) -> str:
    """``chatglm-bot generate --greedy`` with the API server's dtype."""
    args = ["generate", "--model", str(tiny_dir("fp32")), "--greedy", "--dtype", "float32"]
    args += ["--max-new-tokens", str(max_new_tokens), "--json"]
    if history:
        path = tmp_path / "history.json"
        path.write_text(json.dumps(history), encoding="utf-8")
        args += ["--history", str(path)]
    result = run_cli([*args, query], {})
    assert result.returncode == 0, result.stderr
    text: str = json.loads(result.stdout)["text"]
    return text


def as_messages(query: str, history: list[list[str]]) -> list[ChatCompletionMessageParam]:
    messages: list[ChatCompletionMessageParam] = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": query}]


def streamed(
    client: openai.OpenAI, messages: list[ChatCompletionMessageParam], **kwargs: Any
) -> tuple[str, list[Any]]:
    chunks = list(
        client.chat.completions.create(
            model="any", messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def wait_idle(api: ApiProcess, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, body = api.get("/healthz")
        health = json.loads(body)
        if health["queue_depth"] == 0 and health["in_flight"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not become idle: {health}")


def test_models_health_and_metrics(api: ApiProcess, client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["chatglm2-tiny-fp32"]
    status, _, body = api.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = api.get("/metrics")
    assert status == 200 and b"chatglm_bot_queue_depth" in body


def test_greedy_answers_equal_generate_streamed_or_not(
    api: ApiProcess, client: openai.OpenAI, tmp_path: Path
) -> None:
    history = MULTI["history"]
    want = generate(MULTI["query"], history, tmp_path)
    messages = as_messages(MULTI["query"], history)
    whole = client.chat.completions.create(model="chatglm2-tiny-fp32", messages=messages, **GREEDY)
    assert whole.choices[0].message.content == want
    assert whole.choices[0].finish_reason == "length"  # random weights: no eos within 8 tokens
    assert whole.object == "chat.completion" and whole.usage is not None
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens == len(MULTI["input_ids"])
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8
    text, chunks = streamed(client, messages, **GREEDY)
    assert text == want
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_a_follow_up_reuses_the_served_prefix_and_answers_as_without(
    api: ApiProcess, client: openai.OpenAI, tmp_path: Path
) -> None:
    system, question = "You are terse.", "What is the capital of France?"
    first_messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
    ]
    first = client.chat.completions.create(model="m", messages=first_messages, **GREEDY)
    answer = first.choices[0].message.content
    assert answer is not None and first.usage is not None
    folded = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"{system}\n\n{question}"}], **GREEDY
    )
    assert folded.choices[0].message.content == answer  # the system text leads the first query
    wait_idle(api)
    time.sleep(0.5)  # the idle work that appends the answer to the kept KV
    reused = api.metric("chatglm_bot_prefix_reused_tokens_total")
    follow_up: list[ChatCompletionMessageParam] = [
        *first_messages,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And Spain?"},
    ]
    second = client.chat.completions.create(model="m", messages=follow_up, **GREEDY)
    assert second.usage is not None
    assert api.metric("chatglm_bot_prefix_reused_tokens_total") - reused >= first.usage.total_tokens - 4
    want = generate("And Spain?", [[f"{system}\n\n{question}", answer]], tmp_path)
    assert second.choices[0].message.content == want


def test_stop_sequences_cut_the_text(client: openai.OpenAI) -> None:
    messages = as_messages("hello there", [])
    full = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert text is not None and len(text) > 6
    stop = text[4:6]
    cut = text[: text.index(stop)]
    whole = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=24, stop=[stop]
    )
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and 0 < whole.usage.completion_tokens < 24
    text_streamed, chunks = streamed(client, messages, temperature=0, max_tokens=24, stop=stop)
    assert text_streamed == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    messages = as_messages("tell me a story", [])
    texts = {
        client.chat.completions.create(
            model="m", messages=messages, temperature=1.0, top_p=0.9, seed=11, max_tokens=12
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (b"{not json", None),
        ([USER], None),
        ({"model": "m"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [USER, {"role": "assistant", "content": "yo"}]}, "messages[1].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [USER, USER]}, "messages[1].role"),
        (
            {
                "messages": [
                    USER,
                    {"role": "assistant", "content": "a"},
                    {"role": "system", "content": "s"},
                    USER,
                ]
            },
            "messages[2].role",
        ),
        ({"messages": [USER], "n": 2}, "n"),
        ({"messages": [USER], "max_tokens": "5"}, "max_tokens"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
        ({"messages": [USER], "temperature": "hot"}, "temperature"),
        ({"messages": [USER], "temperature": 3}, "temperature"),
        ({"messages": [USER], "top_p": 1.5}, "top_p"),
        ({"messages": [USER], "stream": "yes"}, "stream"),
        ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [USER], "stop": 7}, "stop"),
        ({"messages": [USER], "seed": 1.5}, "seed"),
        ({"messages": [USER], "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": "天气 " * 300}]}, "messages"),
    ],
)
def test_bad_requests_are_400_naming_the_field(api: ApiProcess, payload: Any, param: str | None) -> None:
    status, _, body = post_json(api, payload)
    assert status == 400, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_the_openai_client_sees_400_with_the_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "assistant", "content": "x"}])
    assert caught.value.status_code == 400 and caught.value.param == "messages[0].role"


def test_a_missing_or_wrong_api_key_is_401(api: ApiProcess) -> None:
    for key in (None, "wrong-key"):
        status, _, body = post_json(api, {"messages": [USER]}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=api.base_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert request(f"{api.url}/healthz")[0] == 200  # health and metrics stay open
    assert API_KEY not in api.log()


def test_a_full_queue_is_429_with_retry_after(api: ApiProcess, client: openai.OpenAI) -> None:
    messages = as_messages("a long answer please", [])
    running = client.chat.completions.create(model="m", messages=messages, stream=True, max_tokens=150)
    try:
        next(iter(running))
        queued = client.chat.completions.create(model="m", messages=messages, stream=True, max_tokens=150)
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model="m", messages=messages, max_tokens=4)
            assert caught.value.status_code == 429 and caught.value.code == "queue_full"
            assert caught.value.response.headers["retry-after"] == "1"
        finally:
            queued.close()
    finally:
        running.close()
    wait_idle(api)


def test_a_client_that_disconnects_cancels_its_generation(api: ApiProcess, client: openai.OpenAI) -> None:
    wait_idle(api)
    cancelled = api.metric("chatglm_bot_generations_total", result="GenerationCancelled")
    tokens = api.metric("chatglm_bot_tokens_generated_total")
    stream = client.chat.completions.create(
        model="m", messages=as_messages("go on", []), stream=True, max_tokens=200
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    deadline = time.monotonic() + 10
    while api.metric("chatglm_bot_generations_total", result="GenerationCancelled") == cancelled:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    # 200 tokens at 10 ms each would take 2 s; it stopped right after the disconnect.
    assert api.metric("chatglm_bot_tokens_generated_total") - tokens < 100


def test_503_while_the_model_loads(tmp_path: Path) -> None:
    with api_server(tmp_path, tiny_env(BOT_TEST_LOAD_DELAY_S="60"), ready=False) as api:
        status, _, body = api.get("/healthz")
        assert status == 503 and json.loads(body)["status"] == "starting"
        status, headers, error = post_json(api, {"messages": [USER]})
        assert status == 503 and error["error"]["code"] == "model_loading"
        assert int(headers["Retry-After"]) > 0


async def test_the_openai_backend_on_the_api_answers_like_the_local_engine(
    api: ApiProcess, tmp_path: Path
) -> None:
    from bot.generation import GenerationParams, GenerationRequest
    from bot.model.engine import ChatGLM2Generator
    from bot.openai_backend import OpenAIService
    from tests.support import make_settings

    settings = make_settings(
        tmp_path,
        backend="openai",
        openai_base_url=api.base_url,
        openai_api_key=API_KEY,
        openai_model="chatglm2-tiny-fp32",
        model_path=str(tiny_dir("fp32")),
    )
    request = GenerationRequest(
        query=MULTI["query"],
        history=tuple((q, a) for q, a in MULTI["history"]),
        params=GenerationParams(max_new_tokens=8, temperature=0.0),
    )
    local = ChatGLM2Generator.load(tiny_dir("fp32"), dtype="float32", device="cpu", max_batch_size=1)
    want = local.generate(request, lambda _d: None, lambda: False)
    service = OpenAIService(settings)
    await service.start()
    try:
        stream = service.stream(request)
        text = "".join([delta async for delta in stream])
    finally:
        await service.close()
    assert stream.result is not None
    assert text == stream.result.text == want.text
    assert (stream.result.prompt_tokens, stream.result.new_tokens) == (want.prompt_tokens, want.new_tokens)
    assert stream.result.hit_limit
    assert service.prompt_tokens(request.query, request.history) == want.prompt_tokens  # the same tokenizer


def test_chat_with_backend_openai_answers_through_the_api(api: ApiProcess, tmp_path: Path) -> None:
    single = next(p for p in expected()["fp32"] if p["name"] == "zh_single")
    query = next(p for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == "zh_single")["query"]
    env = {
        "BOT_BACKEND": "openai",
        "BOT_OPENAI_BASE_URL": api.base_url,
        "BOT_OPENAI_API_KEY": API_KEY,
        "BOT_OPENAI_MODEL": "chatglm2-tiny-fp32",
        "BOT_MODEL_PATH": str(tiny_dir("fp32")),
        "BOT_DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}",
        "BOT_TEMPERATURE": "0",
        "BOT_MAX_NEW_TOKENS": "8",
    }
    result = run_cli(["chat"], env, stdin=query + "\nquit\n", timeout=60)
    assert result.returncode == 0, result.stderr
    assert single["chat_response_greedy_8"] in result.stdout
    assert API_KEY not in result.stdout + result.stderr


def test_bot_api_port_is_read_and_a_busy_one_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["api"], tiny_env(BOT_API_PORT=str(port)), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("chatglm-bot: error: BOT_API_PORT:") and str(port) in lines[0]
    )


def test_text_parts_and_the_developer_role_read_as_plain_text_and_system(api: ApiProcess) -> None:
    def answer(messages: list[dict[str, Any]]) -> str:
        status, _, body = post_json(api, {"messages": messages, **GREEDY})
        assert status == 200, body
        content: str = body["choices"][0]["message"]["content"]
        return content

    plain = answer([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello world"}])
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    assert answer([{"role": "developer", "content": "Be kind."}, {"role": "user", "content": parts}]) == plain
    assert answer([{"role": "user", "content": parts}]) != plain  # the system text did count


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(api: ApiProcess) -> None:
    wait_idle(api)
    cancelled = api.metric("chatglm_bot_generations_total", result="GenerationCancelled")
    body = json.dumps({"messages": [USER], "max_tokens": 200}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 10
        while json.loads(api.get("/healthz")[2])["in_flight"] == 0:  # until it is decoding
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while api.metric("chatglm_bot_generations_total", result="GenerationCancelled") == cancelled:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
