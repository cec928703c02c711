"""A ``POST /v1/chat/completions`` body -> ``ChatCompletionRequest``, or an ``ApiError`` (400) naming
the field. Fields this server does not use (``frequency_penalty``, ``user``, ...) are ignored, as
OpenAI-compatible servers do; ``top_k`` is the server's (``BOT_TOP_K``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from bot.api.errors import bad_request
from bot.api.messages import ROLES, to_turns
from bot.config import Settings
from bot.generation import GenerationParams, Turn

MAX_STOP_SEQUENCES = 4
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ChatCompletionRequest:
    model: str
    query: str
    history: tuple[Turn, ...]
    params: GenerationParams
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def parse_chat_request(body: object, settings: Settings) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = _optional(body, "model", str) or ""
    query, history = to_turns(_messages(body.get("messages")))
    n = _optional(body, "n", int)
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "n")
    stream = bool(_optional(body, "stream", bool))
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        include_usage = bool(_optional(options, "include_usage", bool, "stream_options.include_usage"))
    return ChatCompletionRequest(
        model=model,
        query=query,
        history=history,
        params=_params(body, settings),
        stream=stream,
        include_usage=include_usage,
        stop=_stop(body.get("stop")),
    )


def _params(body: dict[str, object], settings: Settings) -> GenerationParams:
    max_tokens = _optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise bad_request("max_tokens must be at least 1", "max_tokens")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:  # only the most likely token is left: greedy
        temperature = 0.0
    seed = _optional(body, "seed", int)
    return GenerationParams(
        max_new_tokens=settings.max_new_tokens if max_tokens is None else max_tokens,
        temperature=settings.temperature if temperature is None else temperature,
        top_p=settings.top_p if top_p is None or top_p == 0.0 else top_p,
        top_k=settings.top_k,
        seed=seed,
    )


def _messages(raw: object) -> list[tuple[str, str]]:
    if raw is None:
        raise bad_request("messages is required", "messages")
    if not isinstance(raw, list):
        raise bad_request("messages must be an array", "messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", where)
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request("role must be a string", f"{where}.role")
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        if role not in ROLES:
            raise bad_request(f"unsupported role {role!r}; use system, user or assistant", f"{where}.role")
        messages.append((role, _content(message.get("content"), f"{where}.content")))
    return messages


def _content(raw: object, where: str) -> str:
    """A string, or an array of text parts (joined); images and audio are not supported."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        texts = []
        for i, part in enumerate(raw):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise bad_request("only text content parts are supported", f"{where}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request("content must be a string or an array of text parts", where)


def _stop(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not (isinstance(stops, list) and all(isinstance(stop, str) for stop in stops)):
        raise bad_request("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", "stop")
    return tuple(stop for stop in stops if stop)


def _optional(body: dict[str, object], name: str, kind: type[T], where: str | None = None) -> T | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int subclass: true is no valid max_tokens, and 1 is no valid stream flag.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"{name} must be {_KIND_NAMES[kind]}", where or name)
    return value


def _number(body: dict[str, object], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{name} must be a number", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low:g} and {high:g}", name)
    return float(value)


_KIND_NAMES: dict[type, str] = {str: "a string", int: "an integer", bool: "a boolean"}
