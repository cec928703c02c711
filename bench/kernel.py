"""Benchmark of the int4 matmul kernel on ChatGLM2-6B's linear shapes, against PyTorch's int4pack and bf16.

Prints one JSON object: per-shape milliseconds (one layer's matmul), the total for the 28 layers at N=1
(decode) and N=64 (prefill), the output layer, one decode token's linears (28 layers + output layer),
and the weight bytes per second at N=1, for each method.
Weights are random; a pool of distinct layers (bigger than the L3 cache) is cycled through so every
matmul reads its weights from memory, as in the model. Timings are the minimum over --repeats passes,
since other processes on the machine make single runs noisy.

    python -m bench.kernel [--threads 2] [--repeats 5] [--tokens 1 64] [--no-baselines] [--no-amx]
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

from bot.model.kernels import build, layout, ops

LAYER_SHAPES = {
    "qkv": (4608, 4096),
    "dense": (4096, 4096),
    "h_to_4h": (27392, 4096),
    "4h_to_h": (4096, 13696),
}
OUTPUT_SHAPE = (65024, 4096)
LAYERS = 28
GROUP = 128  # int4pack group size

Matmul = Callable[[torch.Tensor], torch.Tensor]


def random_official(out: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    qweight = torch.randint(-128, 128, (out, in_features // 2), dtype=torch.int8)
    scale = (torch.rand(out) * 0.004 + 0.001).half()
    return qweight, scale


def native_matmul(out: int, in_features: int) -> Matmul:
    w = layout.PackedInt4.from_official(*random_official(out, in_features))
    return lambda x: ops.int4_linear(x, w)


def int4pack_matmul(out: int, in_features: int) -> Matmul:
    q = torch.randint(0, 16, (out, in_features), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_and_zeros = torch.rand(in_features // GROUP, out, 2, dtype=torch.bfloat16)
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)


def bf16_matmul(out: int, in_features: int) -> Matmul:
    w = torch.randn(out, in_features, dtype=torch.bfloat16)
    return lambda x: torch.nn.functional.linear(x, w)


METHODS: dict[str, tuple[Callable[[int, int], Matmul], torch.dtype, float]] = {
    # name: (weight factory, activation dtype, weight bytes per parameter)
    "native": (native_matmul, torch.float32, 0.5),
    "int4pack": (int4pack_matmul, torch.bfloat16, 0.5),
    "bf16": (bf16_matmul, torch.bfloat16, 2.0),
}


def time_shapes(
    factory: Callable[[int, int], Matmul],
    dtype: torch.dtype,
    shapes: dict[str, tuple[int, int]],
    pool: int,
    tokens: list[int],
    repeats: int,
) -> dict[str, dict[int, float]]:
    """Minimum milliseconds per shape and token count for one matmul.

    Calls go layer by layer, as in the model, through `pool` distinct layers: between two uses of one
    weight the others pass through the cache, so every call reads its weights from memory."""
    layers = [{name: factory(*shape) for name, shape in shapes.items()} for _ in range(pool)]
    best: dict[str, dict[int, float]] = {name: {} for name in shapes}
    for n in tokens:
        inputs = {name: torch.randn(n, shape[1], dtype=dtype) for name, shape in shapes.items()}
        for name in shapes:  # warm-up
            layers[0][name](inputs[name])
        for _ in range(repeats):
            seconds = dict.fromkeys(shapes, 0.0)
            for layer in layers:
                for name, matmul in layer.items():
                    started = time.perf_counter()
                    matmul(inputs[name])
                    seconds[name] += time.perf_counter() - started
            for name, total in seconds.items():
                ms = total * 1000 / pool
                best[name][n] = min(best[name].get(n, ms), ms)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--pool", type=int, default=2, help="distinct layers cycled through (>= 2 beats L3)")
    parser.add_argument("--no-baselines", action="store_true", help="only the native kernel")
    parser.add_argument("--no-amx", action="store_true", help="VPDPBUSD even where AMX-INT8 would serve")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_amx:
        build.set_amx(False)
    methods = ["native"] if args.no_baselines else list(METHODS)
    layer_params = sum(o * i for o, i in LAYER_SHAPES.values())
    result: dict[str, object] = {
        "backend": build.backend_name(),
        "threads": args.threads,
        "repeats": args.repeats,
        "timing": "min over repeats; other processes share the cores",
    }
    per_shape: dict[str, dict[str, dict[int, float]]] = {}
    totals: dict[str, dict[int, float]] = {}
    output_layer: dict[str, dict[int, float]] = {}
    gbps: dict[str, float] = {}
    token: dict[str, float] = {}
    with torch.inference_mode():
        for method in methods:
            factory, dtype, bytes_per_param = METHODS[method]
            shapes = time_shapes(factory, dtype, LAYER_SHAPES, args.pool, args.tokens, args.repeats)
            per_shape[method] = {
                name: {n: round(ms, 2) for n, ms in by_n.items()} for name, by_n in shapes.items()
            }
            totals[method] = {n: round(LAYERS * sum(s[n] for s in shapes.values()), 1) for n in args.tokens}
            head = time_shapes(factory, dtype, {"output": OUTPUT_SHAPE}, 1, [1], args.repeats)["output"]
            output_layer[method] = {1: round(head[1], 2)}
            if 1 in args.tokens:
                seconds = totals[method][1] / 1000
                gbps[method] = round(LAYERS * layer_params * bytes_per_param / seconds / 1e9, 1)
                token[method] = round(totals[method][1] + head[1], 1)
    result["per_shape_ms"] = per_shape
    result["layers28_ms"] = totals
    result["output_layer_ms"] = output_layer
    result["layers28_weight_gb_per_s_n1"] = gbps
    result["decode_token_linears_ms"] = token  # 28 layers + output layer, N=1
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
