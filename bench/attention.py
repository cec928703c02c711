"""Decode attention on ChatGLM2-6B's shapes: the compiled kernel (attention.cpp) against PyTorch's path.

One new token per cache row over bfloat16 caches of 32 query heads, 2 key/value groups and head size
128, every row at the same context length, in rows of an 8,192-slot cache as in the bot; milliseconds
for the 28 layers of one decode step (no checkpoint needed: attention's cost does not depend on the
values).

    python -m bench.attention [--threads 2] [--contexts 128 1150 2048] [--rows 1 8] [--repeats 20]

prints JSON: {"28_layers_ms": {"<context>": {"<rows>": {"compiled": ms, "pytorch": ms}}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as python bench/<name>.py: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.model.kernels import build, ops
from bot.model.model import decode_attention

HEADS, GROUPS, DIM, LAYERS = 32, 2, 128, 28
CACHE_SLOTS = 8192  # the bot's default BOT_MAX_CONTEXT_TOKENS


def time_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def measure(context: int, rows: int, repeats: int) -> dict[str, float]:
    # As in the model: rows of a cache sized for the longest context, of which the first slots are used.
    slots = max(context, CACHE_SLOTS)
    q = torch.randn(rows, HEADS, DIM).bfloat16()
    k = torch.randn(rows, GROUPS, slots, DIM).bfloat16()
    v = torch.randn(rows, GROUPS, slots, DIM).bfloat16()
    k_seen, v_seen = k[:, :, :context], v[:, :, :context]
    positions = torch.full((rows,), context - 1)
    mask = None if rows == 1 else torch.ones(rows, 1, 1, context, dtype=torch.bool)
    result = {
        "pytorch": LAYERS * time_ms(lambda: decode_attention(q[:, :, None], k_seen, v_seen, mask), repeats)
    }
    if build.available():
        result["compiled"] = LAYERS * time_ms(lambda: ops.decode_attention(q, k, v, positions), repeats)
    return {name: round(ms, 2) for name, ms in result.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1150, 2048])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if min(args.contexts) < 1 or min(args.rows) < 1 or args.repeats < 1:
        parser.error("contexts, rows and repeats must be positive")
    torch.set_num_threads(args.threads)
    report = {
        "kernel": build.backend_name(),
        "threads": args.threads,
        "timing": "min over repeats",
        "28_layers_ms": {
            str(context): {str(rows): measure(context, rows, args.repeats) for rows in args.rows}
            for context in args.contexts
        },
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
