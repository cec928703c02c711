"""Streaming clients against ``chatglm-bot api`` next to the same load in-process, in one run.

N clients each hold an R-turn conversation (every turn resends the history with the previous answers,
as an OpenAI client does; greedy, ``--answer-tokens`` per answer); the clients run concurrently. TTFT
is the time from sending a request to its first text (over the API: the first content chunk; in-process:
the first delta from ``service.stream()``, measured with bench/chat.py's ``timed``). Aggregate tokens/s
is all answer tokens over the wall time of the whole load; ``reused_prompt_fraction`` is the share of
the load's prompt tokens whose KV came from the prefix cache (the prefix-cache counters). The
in-process run goes first, through a ``ModelService`` built as bench/chat.py builds it (each client a
conversation key); then the API server is started on the same checkpoint (or ``--url`` is used) and
gets the same queries, without keys: its prefix cache finds each turn's earlier prompt by tokens.

    python bench/api.py [--model DIR] [--url http://host:8000/v1] [--clients 4] [--turns 3] --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

if __package__ in (None, ""):  # run as python bench/<name>.py: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bench.chat import query, timed
from bot.generation import GenerationParams, GenerationRequest, Turn
from bot.model.engine import ChatGLM2Generator
from bot.service import ModelService

START_TIMEOUT_S = 900.0  # a full-size checkpoint's first start compiles the int4 kernel


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 (median) and p99 (nearest rank)."""
    ordered = sorted(values)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3)}


def summary(ttfts: list[float], tokens: int, wall_s: float, reuse: tuple[float, float]) -> dict[str, Any]:
    reused, prompt = reuse
    return {
        "requests": len(ttfts),
        "ttft_s": percentiles(ttfts),
        "tokens_per_s": round(tokens / max(wall_s, 1e-9), 3),
        "wall_s": round(wall_s, 3),
        "reused_prompt_fraction": round(reused / max(prompt, 1.0), 3),
    }


REUSE_METRICS = ("chatglm_bot_prefix_reused_tokens_total", "chatglm_bot_prompt_tokens_total")


def local_reuse() -> tuple[float, float]:
    """(reused, prompt) tokens so far in this process."""
    reused, prompt = (REGISTRY.get_sample_value(name) or 0.0 for name in REUSE_METRICS)
    return reused, prompt


def server_reuse(base_url: str) -> tuple[float, float]:
    """(reused, prompt) tokens so far, from the server's /metrics (next to its /v1)."""
    with urllib.request.urlopen(
        base_url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=30
    ) as response:
        text = response.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    reused, prompt = (values.get(name, 0.0) for name in REUSE_METRICS)
    return reused, prompt


def since(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


async def in_process(args: Any, queries: list[list[str]], generator: ChatGLM2Generator) -> dict[str, Any]:
    service = ModelService(lambda: generator, queue_size=64, timeout_s=24 * 3600)
    await service.start()
    params = GenerationParams(max_new_tokens=args.answer_tokens, temperature=0.0)

    async def client(number: int) -> tuple[list[float], int]:
        history: tuple[Turn, ...] = ()
        ttfts, tokens = [], 0
        for text in queries[number]:
            request = GenerationRequest(text, history, params, conversation=f"bench-api-{number}")
            first, _, new_tokens, answer = await timed(service, request)
            ttfts.append(first)
            tokens += new_tokens
            history = (*history, (text, answer))
        return ttfts, tokens

    try:
        await timed(service, GenerationRequest(query="warm up", params=GenerationParams(max_new_tokens=2)))
        before = local_reuse()
        started = time.perf_counter()
        results = await asyncio.gather(*(client(i) for i in range(args.clients)))
        wall = time.perf_counter() - started
        reuse = since(before, local_reuse())
    finally:
        await service.close()
    return summary([t for ttfts, _ in results for t in ttfts], sum(n for _, n in results), wall, reuse)


async def over_api(args: Any, base_url: str, queries: list[list[str]]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"

    async def ask(http: aiohttp.ClientSession, messages: list[dict[str, str]]) -> tuple[float, int, str]:
        body = {
            "model": "bench",
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": args.answer_tokens,
        }
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        tokens = 0
        async with http.post(url, json=body, headers=headers) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data:"))
                for choice in chunk["choices"]:
                    content = choice["delta"].get("content")
                    if content:
                        first = first or time.perf_counter()
                        parts.append(content)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        return (first or end) - started, tokens, "".join(parts)

    async def client(http: aiohttp.ClientSession, number: int) -> tuple[list[float], int]:
        messages: list[dict[str, str]] = []
        ttfts, total = [], 0
        for text in queries[number]:
            messages.append({"role": "user", "content": text})
            ttft, tokens, answer = await ask(http, messages)
            messages.append({"role": "assistant", "content": answer})
            ttfts.append(ttft)
            total += tokens
        return ttfts, total

    timeout = aiohttp.ClientTimeout(total=24 * 3600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await ask(http, [{"role": "user", "content": "warm up"}])
        before = await asyncio.to_thread(server_reuse, base_url)
        started = time.perf_counter()
        results = await asyncio.gather(*(client(http, i) for i in range(args.clients)))
        wall = time.perf_counter() - started
        reuse = since(before, await asyncio.to_thread(server_reuse, base_url))
    ttfts = [t for each, _ in results for t in each]
    return {"url": base_url, **summary(ttfts, sum(n for _, n in results), wall, reuse)}


@contextmanager
def api_server(args: Any) -> Iterator[str]:
    """``python -m bot api`` on a free port with the bench's model and threads; yields its /v1 URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    env.update(
        BOT_MODEL_PATH=str(args.model),
        BOT_MODEL_DTYPE=args.dtype,
        BOT_DEVICE="cpu",
        BOT_NUM_THREADS=str(args.threads),
        BOT_MAX_BATCH_SIZE=str(args.clients),
        BOT_MAX_NEW_TOKENS=str(args.answer_tokens),
        BOT_PREFIX_CACHE_MB=str(args.prefix_cache_mb),
    )
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bot", "api", "--host", "127.0.0.1", "--port", str(port)],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(process, f"http://127.0.0.1:{port}/healthz", log)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], health: str, log: Any) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(
                f"chatglm-bot api exited with {process.returncode}: {log.read().decode()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(health, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"chatglm-bot api did not start within {START_TIMEOUT_S:g} s")


def run(args: Any) -> dict[str, Any]:
    generator = ChatGLM2Generator.load(
        args.model,
        dtype=args.dtype,
        device="cpu",
        num_threads=args.threads,
        max_batch_size=args.clients,
        prefix_cache_mb=args.prefix_cache_mb,
    )
    queries = [
        [query(generator, 100 * c + t, args.query_tokens) for t in range(args.turns)]
        for c in range(args.clients)
    ]
    report: dict[str, Any] = {
        "model": str(args.model),
        "threads": args.threads,
        "clients": args.clients,
        "turns": args.turns,
        "answer_tokens": args.answer_tokens,
    }
    report["in_process"] = asyncio.run(in_process(args, queries, generator))
    del generator  # the server loads its own copy
    if args.url:
        report["api"] = asyncio.run(over_api(args, args.url, queries))
    else:
        with api_server(args) as url:
            report["api"] = asyncio.run(over_api(args, url, queries))
    api, local = report["api"], report["in_process"]
    report["api_vs_in_process"] = {
        "ttft_p50_ratio": round(api["ttft_s"]["p50"] / max(local["ttft_s"]["p50"], 1e-9), 3),
        "tokens_per_s_ratio": round(api["tokens_per_s"] / max(local["tokens_per_s"], 1e-9), 3),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=common.DEFAULT_MODEL)
    parser.add_argument("--url", help="an already running server's /v1 URL (default: start one)")
    parser.add_argument("--api-key", default=os.environ.get("BOT_API_KEY", ""), help="its BOT_API_KEY")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--turns", type=int, default=3, help="requests per client, one conversation")
    parser.add_argument("--query-tokens", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--prefix-cache-mb", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.turns < 1:
        parser.error("--clients and --turns must be >= 1")
    report = run(args)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
