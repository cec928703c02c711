"""Chat speed through the real ModelService (queue + inference thread): TTFT across turns with and
without prefix KV reuse, aggregate decode tokens/s of 1..8 concurrent conversations, peak RSS.

Every turn asks ~``--query-tokens`` new tokens and gets a greedy ``--answer-tokens`` answer (random
weights rarely emit eos; the measured counts are used anyway). TTFT is the time from
``service.stream()`` to the first text delta, as a user sees it. Between turns the bench waits, as a
user writing the next message would, until the inference thread has used its idle time to prefill
the answer into the kept KV (``idle_extension_s``: how long that took, the median over turns).
``turn10_full_prefill`` asks turn 10's exact request under a fresh conversation key, so nothing is
reused. ``prefill`` reports, for the same three requests, the prompt length, the tokens whose KV was
reused and the prefill seconds (summed over its prefill chunks). A short warm-up request runs
first. Decode throughput for N conversations: N requests (no conversation key: they share at most
the prompt header with earlier ones) are queued at once, and tokens are counted from the moment the
last one streamed its first text (all prefills done) until all are done.

    python -m bench.chat [--model DIR] [--threads 2] [--turns 10] [--concurrency 1 2 4 8] --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as python bench/<name>.py: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bot.generation import GenerationParams, GenerationRequest, Turn
from bot.model.engine import ChatGLM2Generator, ChatState
from bot.model.kv_cache import read_kv, write_kv
from bot.service import ModelService

WORDS = ("river", "quiet", "mountain", "number", "yellow", "answer", "garden", "window", "train", "paper")


def query(generator: ChatGLM2Generator, seed: int, tokens: int) -> str:
    """A query of about ``tokens`` tokens; different per ``seed`` so no two turns share text."""
    words: list[str] = []
    n = seed
    while generator.count_tokens(" ".join(words)) < tokens:
        words.append(f"{WORDS[n % len(WORDS)]}{n % 97}")
        n = n * 7 + 3
    return " ".join(words)


async def timed(service: ModelService, request: GenerationRequest) -> tuple[float, float, int, str]:
    """(seconds to the first text delta, seconds to the end, new tokens, text)."""
    started = time.perf_counter()
    first = None
    stream = service.stream(request)
    async for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert stream.result is not None
    return (first or end) - started, end - started, stream.result.new_tokens, stream.result.text


def record_prefills(generator: ChatGLM2Generator) -> list[ChatState]:
    """Every state ``begin`` returns, appended as it is made (for its prefill numbers)."""
    states: list[ChatState] = []
    begin = generator.begin

    def recording(
        request: GenerationRequest, on_text: Callable[[str], None], should_stop: Callable[[], bool]
    ) -> ChatState:
        state = begin(request, on_text, should_stop)
        states.append(state)
        return state

    setattr(generator, "begin", recording)  # noqa: B010 (an instance attribute shadows the method)
    return states


async def conversation_ttft(service: ModelService, generator: ChatGLM2Generator, args: Any) -> dict[str, Any]:
    params = GenerationParams(max_new_tokens=args.answer_tokens, temperature=0.0)
    states = record_prefills(generator)
    history: tuple[Turn, ...] = ()
    ttft: dict[str, float] = {}
    prefill: dict[str, dict[str, float]] = {}
    waits: list[float] = []
    for number in range(1, args.turns + 1):
        if number > 1:
            waits.append(await idle_done(generator))
        text = query(generator, number, args.query_tokens)
        request = GenerationRequest(query=text, history=history, params=params, conversation="ttft")
        requests = {f"turn{number}": request}
        if number == args.turns:
            fresh = GenerationRequest(query=text, history=history, params=params, conversation="ttft-fresh")
            requests[f"turn{number}_full_prefill"] = fresh
        answer = ""
        for name, each in requests.items():
            first, _, _, reply = await timed(service, each)
            answer = answer or reply
            if number in (1, args.turns):
                ttft[name] = round(first, 3)
                state = states[-1]
                prefill[name] = {
                    "prompt_tokens": len(state.prompt_ids),
                    "reused_tokens": state.reused,
                    "prefill_s": round(state.prefill_s, 3),
                }
        history = (*history, (text, answer))
    del generator.begin
    return {"ttft_s": ttft, "prefill": prefill, "idle_extension_s": round(statistics.median(waits), 3)}


async def idle_done(generator: ChatGLM2Generator, limit_s: float = 600.0) -> float:
    """Seconds until the generator has no idle work left (polled; at most ``limit_s``)."""
    started = time.perf_counter()
    # Polled: the work is on the inference thread, which signals nothing when it is done.
    while generator.pending_idle_work and time.perf_counter() - started < limit_s:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def decode_throughput(
    service: ModelService, generator: ChatGLM2Generator, args: Any, concurrency: int
) -> float:
    params = GenerationParams(max_new_tokens=args.decode_tokens, temperature=0.0)
    requests = [
        GenerationRequest(
            query=query(generator, 1000 * concurrency + i, args.query_tokens),
            params=params,
        )
        for i in range(concurrency)
    ]
    results = await asyncio.gather(*(timed(service, r) for r in requests))
    decoding_from = max(first for first, _, _, _ in results)
    decoding_to = max(end for _, end, _, _ in results)
    tokens = sum(new - 1 for _, _, new, _ in results)  # each first token came from its prefill
    return tokens / max(decoding_to - decoding_from, 1e-9)


async def memory_under_conversations(
    service: ModelService, generator: ChatGLM2Generator, args: Any
) -> dict[str, Any]:
    params = GenerationParams(max_new_tokens=4, temperature=0.0)
    most = 0
    for n in range(args.memory_conversations):
        text = query(generator, 5000 + n, args.query_tokens)
        await timed(service, GenerationRequest(query=text, params=params, conversation=f"mem-{n}"))
        most = max(most, generator.prefix_cache.total_bytes)
    return {
        "conversations": args.memory_conversations,
        "prefix_cache_limit_mb": generator.prefix_cache.max_bytes / 2**20,
        "prefix_cache_peak_mb": round(most / 2**20, 1),
        "prefix_cache_entries": len(generator.prefix_cache),
    }


def kv_copy_ms_per_1k_tokens(generator: ChatGLM2Generator) -> float:
    """Cost of moving 1024 tokens of KV out of and back into a batch row (the prefix cache's copies)."""
    length = min(1024, generator.max_context_tokens)
    started = time.perf_counter()
    kv = read_kv(generator.model.caches(), 0, length)
    write_kv(generator.model.caches(), 0, kv)
    return (time.perf_counter() - started) * 1000 * 1024 / length


async def run(args: Any) -> dict[str, Any]:
    def load() -> ChatGLM2Generator:
        return ChatGLM2Generator.load(
            args.model,
            dtype=args.dtype,
            device="cpu",
            num_threads=args.threads,
            max_batch_size=max(args.concurrency),
            prefix_cache_mb=args.prefix_cache_mb,
        )

    peak_scope = "this run" if common.reset_peak_rss() else "the whole process"
    service = ModelService(load, queue_size=64, timeout_s=24 * 3600)
    started = time.perf_counter()
    await service.start()
    load_s = time.perf_counter() - started
    generator = service.generator
    assert isinstance(generator, ChatGLM2Generator)
    report: dict[str, Any] = {"model": str(args.model), "threads": args.threads, "load_s": round(load_s, 2)}
    try:
        await timed(service, GenerationRequest(query="warm up", params=GenerationParams(max_new_tokens=2)))
        report.update(await conversation_ttft(service, generator, args))
        ttft = report["ttft_s"]
        report["ttft_ratio_turn_last_to_1"] = round(ttft[f"turn{args.turns}"] / ttft["turn1"], 3)
        decode: dict[str, float] = {}
        for concurrency in args.concurrency:
            decode[str(concurrency)] = round(
                await decode_throughput(service, generator, args, concurrency), 3
            )
        report["decode_tokens_per_s"] = decode
        if "1" in decode and decode["1"] > 0:
            report["decode_speedup_vs_1"] = {n: round(v / decode["1"], 2) for n, v in decode.items()}
        if args.memory_conversations:
            report["memory"] = await memory_under_conversations(service, generator, args)
    finally:
        await service.close()
    report["kv_copy_ms_per_1k_tokens"] = round(kv_copy_ms_per_1k_tokens(generator), 2)
    report["peak_rss_gb"] = round(common.peak_rss_gb(), 2)
    report["peak_rss_scope"] = peak_scope
    report["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return report


def add_arguments(parser: argparse.ArgumentParser, *, memory_conversations: int = 0) -> None:
    """The turn, concurrency and memory options ``run`` reads (bench/decode.py adds them too)."""
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--query-tokens", type=int, default=40, help="new prompt tokens per turn")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32, help="new tokens per concurrent request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prefix-cache-mb", type=int, default=1024)
    parser.add_argument(
        "--memory-conversations", type=int, default=memory_conversations, help="then N 1-turn chats"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.turns < 2 or min(args.concurrency) < 1:
        parser.error("--turns must be >= 2 and --concurrency values >= 1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=common.DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    threads = torch.get_num_threads()
    try:
        report = asyncio.run(run(args))
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
