"""The batch engine's old import path, for importers outside the engine (tests/adapters, and the
docstring of prefix_cache.py): it lives in bot/model/engine.py."""

from bot.model.engine import ChatGLM2Generator, ChatState

__all__ = ["ChatGLM2Generator", "ChatState"]
