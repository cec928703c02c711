"""OpenAI chat messages -> the ChatGLM2 prompt's (query, history), as the official ``build_prompt``
takes them: leading system messages are folded in front of the first user message, then the messages
alternate user / assistant and end with the user's query. deploy/chatglm2_chat_template.jinja
renders the same prompt for vLLM."""

from __future__ import annotations

from collections.abc import Sequence

from bot.api.errors import bad_request
from bot.generation import Turn

ROLES = ("system", "user", "assistant")
SYSTEM_SEPARATOR = "\n\n"  # between the system text and the first query (and between system messages)


def to_turns(messages: Sequence[tuple[str, str]]) -> tuple[str, tuple[Turn, ...]]:
    """(role, content) pairs -> (query, history); ``ApiError`` (400) naming the offending message."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    system: list[str] = []
    start = 0
    while start < len(messages) and messages[start][0] == "system":
        system.append(messages[start][1])
        start += 1
    rest = messages[start:]
    for i, (role, _) in enumerate(rest):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            where = f"messages[{start + i}].role"
            if role == "system":
                raise bad_request("system messages must come before the conversation", where)
            raise bad_request(f"expected a {want} message here (user and assistant alternate)", where)
    if not rest or rest[-1][0] != "user":
        raise bad_request("the last message must be from the user", f"messages[{len(messages) - 1}].role")
    texts = [content for _, content in rest]
    if system:
        texts[0] = SYSTEM_SEPARATOR.join([*system, texts[0]])
    history = tuple((texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2))
    return texts[-1], history
