"""deploy/chatglm2_chat_template.jinja renders exactly our (the official) build_prompt, the way
transformers / vLLM render chat templates."""

from __future__ import annotations

from typing import Any, NoReturn

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bot.api.errors import ApiError
from bot.api.messages import to_turns
from bot.model.tokenizer import ChatGLMTokenizer
from tests.model.fixture import REPO_ROOT

TEMPLATE = REPO_ROOT / "deploy" / "chatglm2_chat_template.jinja"


def render(messages: list[dict[str, str]]) -> str:
    def raise_exception(message: str) -> NoReturn:
        raise ValueError(message)

    # transformers' apply_chat_template environment (vLLM uses it too).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(TEMPLATE.read_text(encoding="utf-8")).render(
        messages=messages, add_generation_prompt=True
    )


def ours(messages: list[dict[str, str]]) -> str:
    query, history = to_turns([(m["role"], m["content"]) for m in messages])
    return ChatGLMTokenizer.build_prompt(query, history)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.mark.parametrize(
    "messages",
    [
        [msg("user", "你好")],
        [msg("user", "What is the capital of France?")],
        [msg("user", "你好"), msg("assistant", "你好！有什么可以帮你的吗？"), msg("user", "那明天呢？")],
        [msg("system", "Be brief."), msg("user", "hi")],
        [
            msg("system", "A."),
            msg("system", "B."),
            msg("user", "q1"),
            msg("assistant", "a1"),
            msg("user", "q2"),
        ],
        [msg("system", ""), msg("user", " spaced \n lines ")],
        [m for i in range(5) for m in (msg("user", f"q{i}"), msg("assistant", f"a{i}"))]
        + [msg("user", "last")],
    ],
)
def test_the_template_renders_build_prompt(messages: list[dict[str, str]]) -> None:
    rendered = render(messages)
    assert rendered == ours(messages)
    assert rendered.startswith("[Round 1]\n\n问：") and rendered.endswith("\n\n答：")


@pytest.mark.parametrize(
    "messages",
    [
        [msg("assistant", "a")],
        [msg("user", "q"), msg("assistant", "a")],
        [msg("user", "q"), msg("user", "q")],
        [msg("user", "q"), msg("assistant", "a"), msg("system", "s"), msg("user", "q")],
        [msg("system", "s")],
    ],
)
def test_the_template_refuses_what_the_api_refuses(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError):
        render(messages)
    with pytest.raises(ApiError):
        ours(messages)
