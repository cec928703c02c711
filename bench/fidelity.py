"""What the fast modes trade against float32, the exact reference: top-1 agreement and logit differences.

float32 reproduces the official greedy answers; the fast modes do not have to. For each checkpoint the
float32 model runs each chat prompt's prefill and then ``--new-tokens`` greedy decode steps; every
mode is then fed the same tokens (teacher forcing, so one early flip does not make every later
position differ) and its logits are compared with float32's at each of those positions, over the
tokenizer's ids (the output layer's padding rows are never tokens). Modes:

* ``float32``: a second float32 load, the check that the reference is deterministic (agreement 1.0,
  differences 0).
* ``bfloat16``: bfloat16 compute on PyTorch's int4 kernels (``int4_kernel="torch"``).
* ``w4a8``: bfloat16 compute on the native int4 x int8 kernel, compiled layers and fused decode
  steps, a two-term int4 output layer (what ``auto`` picks on the CPU where the kernel builds).
* ``auto``: whatever ``dtype="auto"`` loads (float32 for a float32 checkpoint).

Checkpoints: the tiny golden fixtures (tests/fixtures/chatglm2), and with ``--full-size`` the
full-size random int4 checkpoint of bench/make_checkpoint.py (built once, ~3.9 GB), or any
``--model DIR``.

    python -m bench.fidelity [--full-size] [--model DIR ...] [--modes float32 bfloat16 w4a8 auto]
                             [--new-tokens 8] [--threads 0]

prints one JSON object: {"reference": "float32", "kernel": ..., "new_tokens": N,
"checkpoints": {name: {"path", "positions", "modes": {mode: {"dtype", "int4_backend",
"top1_agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "reference_logit_spread"} or
{"unavailable": why}}}}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as python bench/<name>.py: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bot.model.config import ChatGLM2Config
from bot.model.kernels import build
from bot.model.loader import load_model
from bot.model.model import ChatGLM2
from bot.model.quant import int4_backends
from bot.model.threads import default_threads
from bot.model.tokenizer import ChatGLMTokenizer

MODES = ("float32", "bfloat16", "w4a8", "auto")
LOAD_ARGS = {  # mode -> load_model's (dtype, int4_kernel)
    "float32": ("float32", "auto"),
    "bfloat16": ("bfloat16", "torch"),
    "w4a8": ("bfloat16", "native"),
    "auto": ("auto", "auto"),
}
# The golden fixture's three chat prompts (tests/fixtures/chatglm2/README.txt).
QUERIES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("你好，今天天气怎么样？", ()),
    ("What is the capital of France?", ()),
    (
        "那明天呢？ And tomorrow?",
        (("你好", "你好！有什么可以帮你的吗？"), ("What day is it today?", "今天是星期一。")),
    ),
)


@torch.inference_mode()
def logits_along(
    model: ChatGLM2, prompt: list[int], steps: int, vocab: int, fed: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """(logits [steps + 1, vocab] after the prompt's prefill and after each of ``steps`` decode steps,
    the tokens fed): ``fed``'s, or the model's own greedy ones."""
    model.setup_caches(1, len(prompt) + steps + 1)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)), last_only=True)[0, -1, :vocab]
    out, tokens = [logits], []
    for step, position in enumerate(range(len(prompt), len(prompt) + steps)):
        tokens.append(int(logits.argmax()) if fed is None else fed[step])
        logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([position]), last_only=True)[0, -1, :vocab]
        out.append(logits)
    return torch.stack(out), tokens


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    difference = (got - want).abs()
    return {
        "top1_agreement": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4),
        "max_abs_logit_diff": round(float(difference.max()), 4),
        "mean_abs_logit_diff": round(float(difference.mean()), 4),
        "reference_logit_spread": round(float(want.std(dim=-1).mean()), 4),  # for scale
    }


def load(path: Path, mode: str) -> tuple[ChatGLM2, ChatGLMTokenizer, ChatGLM2Config]:
    dtype, int4_kernel = LOAD_ARGS[mode]
    return load_model(path, dtype=dtype, device="cpu", int4_kernel=int4_kernel)


def measure(path: Path, modes: list[str], new_tokens: int) -> dict[str, Any]:
    reference, tokenizer, _ = load(path, "float32")
    vocab = tokenizer.vocab_size
    prompts = [tokenizer.build_chat_input(query, history) for query, history in QUERIES]
    runs = [logits_along(reference, prompt, new_tokens, vocab) for prompt in prompts]
    want = torch.cat([logits for logits, _ in runs])
    del reference
    gc.collect()
    report: dict[str, Any] = {"path": str(path), "positions": want.shape[0], "modes": {}}
    for mode in modes:
        if mode == "w4a8" and not build.available():
            report["modes"][mode] = {"unavailable": build.backend_name()}
            continue
        model, _, _ = load(path, mode)
        got = torch.cat(
            [
                logits_along(model, p, new_tokens, vocab, fed)[0]
                for p, (_, fed) in zip(prompts, runs, strict=True)
            ]
        )
        backends = int4_backends(model)
        report["modes"][mode] = {
            "dtype": str(model.compute_dtype).removeprefix("torch."),
            "int4_backend": ",".join(backends) if backends else "dense",
            **compare(got, want),
        }
        del model
        gc.collect()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, action="append", default=[], help="another checkpoint")
    parser.add_argument("--full-size", action="store_true", help="also the full-size random int4 one")
    parser.add_argument("--no-fixtures", action="store_true", help="skip the tiny golden fixtures")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy decode steps per prompt")
    parser.add_argument("--threads", type=int, default=0, help="0: the bot's default")
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error("--new-tokens must be >= 1")
    checkpoints: dict[str, Path] = {}
    if not args.no_fixtures:
        checkpoints |= {
            f"tiny-{kind}": common.FIXTURE_DIR / f"chatglm2-tiny-{kind}" for kind in ("fp32", "int4")
        }
    if args.full_size:
        from bench.make_checkpoint import build_checkpoint

        checkpoints["full-size-int4-random"] = build_checkpoint(common.DEFAULT_MODEL)
    checkpoints |= {path.name: path for path in args.model}
    if not checkpoints:
        parser.error("no checkpoint to measure")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        results = {name: measure(path, args.modes, args.new_tokens) for name, path in checkpoints.items()}
    finally:
        torch.set_num_threads(threads)
    report = {
        "reference": "float32",
        "kernel": build.backend_name(),
        "new_tokens": args.new_tokens,
        "checkpoints": results,
    }
    print(json.dumps(report, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
