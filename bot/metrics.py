"""Prometheus metrics, defined once per process (the default registry rejects duplicates)."""

from prometheus_client import Counter, Gauge, Histogram, Info

QUEUE_DEPTH = Gauge("chatglm_bot_queue_depth", "Generation requests waiting for the inference thread")
IN_FLIGHT = Gauge("chatglm_bot_in_flight", "Generation requests being decoded now")
TOKENS = Counter("chatglm_bot_tokens_generated", "Tokens produced by the model")
GENERATIONS = Counter(
    "chatglm_bot_generations", "Finished generation requests by result", labelnames=["result"]
)
QUEUE_WAIT = Histogram("chatglm_bot_queue_wait_seconds", "Time from submission to the start of decoding")
FIRST_TEXT = Histogram("chatglm_bot_time_to_first_text_seconds", "Time from submission to the first text")
LATENCY = Histogram(
    "chatglm_bot_generation_seconds",
    "Time from submission to the end of a generation",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)
MESSAGES = Counter(
    "chatglm_bot_messages", "Incoming messages by platform and outcome", labelnames=["platform", "outcome"]
)
PLATFORM_API_ERRORS = Counter(
    "chatglm_bot_platform_api_errors",
    "Failed platform API calls by platform, method and HTTP status (0: no HTTP answer)",
    labelnames=["platform", "method", "status"],
)
PREFIX_CACHE_BYTES = Gauge("chatglm_bot_prefix_cache_bytes", "Memory held by kept conversation KV caches")
PREFIX_CACHE_ENTRIES = Gauge("chatglm_bot_prefix_cache_entries", "Conversations whose KV cache is kept")
PROMPT_TOKENS = Counter("chatglm_bot_prompt_tokens", "Prompt tokens of finished generations")
PREFIX_REUSED_TOKENS = Counter(
    "chatglm_bot_prefix_reused_tokens", "Prompt tokens whose KV came from the prefix cache (not prefilled)"
)
MODEL_INFO = Info("chatglm_bot_model", "The loaded model: checkpoint, dtype, device and int4 kernel")
