"""Full-size ChatGLM2-6B-INT4 speed on this machine: load, prefill, decode, memory, roofline.

Loads a checkpoint folder (default: the random full-size int4 one from bench/make_checkpoint.py)
through the normal loader, then measures in one run: load time, prefill tokens/s for a
``--prompt-tokens`` prompt, greedy decode tokens/s for ``--new-tokens`` tokens, peak RSS, and the
memory read bandwidth (bench/bandwidth.py, measured last so its buffer does not count in the
peak RSS). Decoding streams every weight once per token, so
``roofline_tokens_per_s = bandwidth / bytes_read_per_token`` is the ceiling; the JSON reports the
measured fraction of it.

    python bench/decode.py [--model DIR] [--threads 2] [--dtype auto] [--prompt-tokens 512] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.bandwidth import measure_read_bandwidth  # noqa: E402
from bot.model.generate import decode_one_token, prefill  # noqa: E402
from bot.model.loader import load_model  # noqa: E402
from bot.model.model import ChatGLM2, RMSNorm  # noqa: E402
from bot.model.kernels import vnni  # noqa: E402
from bot.model.quant import Int4Linear, int4_backends  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "chatglm-bot" / "bench" / "int4"


def bytes_per_token(model: ChatGLM2, context: int) -> int:
    """Bytes decoding one token reads: every weight except the embedding table (one row), plus the
    KV cache up to ``context`` positions."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int4Linear):
            packed, vnni_packed = module.packed_cpu, module.packed_vnni
            if vnni_packed is not None:
                total += vnni_packed.packed.nbytes + vnni_packed.scale.nbytes
            elif packed is not None:
                total += packed.weight.nbytes + packed.scales_and_zeros.nbytes
            else:
                total += module.weight.nbytes + module.weight_scale.nbytes
            total += module.bias.nbytes if module.bias is not None else 0
        elif isinstance(module, torch.nn.Linear | RMSNorm):  # the embedding reads one row: skipped
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    config = model.config
    kv = config.num_layers * 2 * config.kv_groups * config.head_dim * model.rope.element_size()
    return total + kv * context


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--int4-kernel", default="auto", choices=("auto", "vnni", "torch"))
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer of the bandwidth probe")
    parser.add_argument("--bandwidth-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, tokenizer, _ = load_model(
        args.model, dtype=args.dtype, device="cpu", int4_kernel=args.int4_kernel
    )
    load_s = time.perf_counter() - started
    rss_after_load = peak_rss_gb()
    context = args.prompt_tokens + args.new_tokens
    model.setup_caches(1, context)

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, tokenizer.sp_vocab_size, (args.prompt_tokens,), generator=gen)
    prompt[:2] = torch.tensor([tokenizer.gmask_id, tokenizer.sop_id])
    started = time.perf_counter()
    logits = prefill(model, prompt)
    prefill_s = time.perf_counter() - started

    token = int(logits[: tokenizer.vocab_size].argmax())
    started = time.perf_counter()
    for step in range(args.new_tokens):
        logits = decode_one_token(model, token, args.prompt_tokens + step)
        token = int(logits[: tokenizer.vocab_size].argmax())
    decode_s = time.perf_counter() - started
    rss_after_decode = peak_rss_gb()  # before the bandwidth probe allocates its buffer

    bandwidth = measure_read_bandwidth(args.bandwidth_seconds, args.threads, args.bandwidth_mb)
    per_token = bytes_per_token(model, args.prompt_tokens + args.new_tokens // 2)
    decode_tps = args.new_tokens / decode_s
    roofline = bandwidth * 1e9 / per_token
    report = {
        "model": str(args.model),
        "threads": args.threads,
        "dtype": str(model.compute_dtype).removeprefix("torch."),
        "int4_backend": ", ".join(int4_backends(model)),
        "vnni_kernel": vnni.backend_name(),
        "load_s": round(load_s, 2),
        "peak_rss_gb_after_load": round(rss_after_load, 2),
        "peak_rss_gb": round(rss_after_decode, 2),
        "prompt_tokens": args.prompt_tokens,
        "prefill_tokens_per_s": round(args.prompt_tokens / prefill_s, 2),
        "new_tokens": args.new_tokens,
        "decode_tokens_per_s": round(decode_tps, 2),
        "read_bandwidth_gb_per_s": round(bandwidth, 2),
        "bytes_read_per_token_gb": round(per_token / 1e9, 3),
        "roofline_tokens_per_s": round(roofline, 2),
        "ratio_to_roofline": round(decode_tps / roofline, 4),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
