"""``chatglm-bot api``: the native engine behind an OpenAI-compatible HTTP API."""
