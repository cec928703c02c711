"""``chatglm-bot generate``: one answer from a local checkpoint, streamed or as one JSON object.

``--json`` prints {"prompt_ids", "output_ids", "text", "logits_head" (first 16 raw logits at the last
prompt position), "timings": {"load_s", "prefill_tokens_per_s", "decode_tokens_per_s"}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bot.generation import GenerationParams, GenerationRequest, Turn
from bot.model.engine import ChatGLM2Generator
from bot.model.loader import ModelLoadError

LOGITS_HEAD = 16


class HistoryError(ValueError):
    pass


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (or hub id)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument(
        "--max-new-tokens", type=int, default=512, metavar="N", help="longest answer in tokens (default 512)"
    )
    parser.add_argument("--history", type=Path, help="JSON file: a list of [query, response] pairs")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype: float32 reproduces the official answers exactly; auto is bfloat16 on CPU",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument("prompt", help="the user's query")


def read_history(path: Path) -> tuple[Turn, ...]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HistoryError(f"cannot read history {path}: {exc}") from None
    if not isinstance(raw, list):
        raise HistoryError(f"history {path} must be a JSON list of [query, response] pairs")
    turns = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise HistoryError(f"history {path} item {i} is not a [query, response] pair of strings")
        turns.append((pair[0], pair[1]))
    return tuple(turns)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        history = read_history(args.history) if args.history else ()
        generator = ChatGLM2Generator.load(args.model, dtype=args.dtype, num_threads=args.threads)
    except (HistoryError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = GenerationParams(max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.greedy:
        params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0, seed=args.seed)
    request = GenerationRequest(query=args.prompt, history=history, params=params)

    def stream(delta: str) -> None:
        if not args.json:
            sys.stdout.write(delta)
            sys.stdout.flush()

    try:
        result = generator.run(request, stream, lambda: False)
    except ValueError as exc:  # prompt too long for the model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = result.output
    if not args.json:
        sys.stdout.write("\n")
        return 0
    decoded = max(len(output.tokens) - 1, 0)  # the first new token comes from the prefill logits
    report = {
        "prompt_ids": result.prompt_ids,
        "output_ids": output.tokens,
        "text": result.text,
        "logits_head": [round(float(v), 6) for v in output.first_logits[:LOGITS_HEAD]],
        "timings": {
            "load_s": round(generator.load_s, 3),
            "prefill_tokens_per_s": round(len(result.prompt_ids) / max(output.prefill_s, 1e-9), 3),
            "decode_tokens_per_s": round(decoded / output.decode_s, 3) if decoded else 0.0,
        },
    }
    print(json.dumps(report, ensure_ascii=False))
    return 0
