"""Measure the machine's memory read bandwidth as torch sees it, for roofline estimates.

Token generation on CPU streams every weight once per token, so tokens/s is bounded by
read bandwidth / bytes of weights. This sums a large float32 buffer with the thread count
inference uses and keeps the best of several passes.

    python -m bench.bandwidth [--seconds 2] [--threads N] [--size-mb 1024]

prints JSON: {"read_gb_per_s": ..., "threads": ..., "size_mb": ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def measure_read_bandwidth(seconds: float = 2.0, threads: int | None = None, size_mb: int = 1024) -> float:
    """Best observed read bandwidth in GB/s (1e9 bytes) over about ``seconds`` of passes."""
    if seconds <= 0 or size_mb <= 0:
        raise ValueError("seconds and size_mb must be positive")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_mb * (1 << 20) // 4, dtype=torch.float32)
        buf.sum()  # fault the pages in before timing
        best = 0.0
        deadline = time.perf_counter() + seconds
        passes = 0
        while passes < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            buf.sum()
            elapsed = time.perf_counter() - start
            best = max(best, buf.numel() * 4 / elapsed / 1e9)
            passes += 1
        return best
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure memory read bandwidth with torch.")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's current thread count")
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args(argv)
    gbps = measure_read_bandwidth(args.seconds, args.threads, args.size_mb)
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    print(json.dumps({"read_gb_per_s": round(gbps, 2), "threads": threads, "size_mb": args.size_mb}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
