"""Test-only delays for the ``chatglm-bot api`` subprocesses of tests/api (on their PYTHONPATH).

``BOT_TEST_TOKEN_DELAY_S``: sleep before each sampled token, so a disconnect lands mid-generation
and a request stays in flight long enough to fill the queue behind it. ``BOT_TEST_LOAD_DELAY_S``:
sleep before the model loads, so the loading phase can be observed.
"""

import os

_TOKEN_DELAY_S = float(os.environ.get("BOT_TEST_TOKEN_DELAY_S", "0"))
_LOAD_DELAY_S = float(os.environ.get("BOT_TEST_LOAD_DELAY_S", "0"))

if _TOKEN_DELAY_S or _LOAD_DELAY_S:
    import time
    from typing import Any

    from bot.model.engine import ChatGLM2Generator, ChatState

    _sample = ChatGLM2Generator._sample
    _load = ChatGLM2Generator.load.__func__  # type: ignore[attr-defined]

    def _slow_sample(self: ChatGLM2Generator, state: ChatState) -> bool:
        time.sleep(_TOKEN_DELAY_S)
        return _sample(self, state)

    def _slow_load(cls: type[ChatGLM2Generator], *args: Any, **kwargs: Any) -> ChatGLM2Generator:
        time.sleep(_LOAD_DELAY_S)
        loaded: ChatGLM2Generator = _load(cls, *args, **kwargs)
        return loaded

    ChatGLM2Generator._sample = _slow_sample  # type: ignore[method-assign]
    ChatGLM2Generator.load = classmethod(_slow_load)  # type: ignore[method-assign,assignment]
