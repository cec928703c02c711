"""The compiled ops on tensors: the int4 x int8 matmul (int4_native.cpp), decode attention
(attention.cpp), the per-token steps of a bfloat16 forward (pointwise.cpp: RMSNorm, SwiGLU, RoPE with
the cache write) and the whole decode step (decode_step.cpp).

``int4_linear`` quantizes activations to int8 per row in blocks of 32 values, so it differs from the
float32 reference by that rounding (bounded by the tests, measured by bench/fidelity.py); without the
kernel it computes the float32 reference ``x @ (q * scale).T`` itself. The other ops are for callers
that checked ``build.kernel()`` (native_layers.py): without it they raise, or return None where the
caller has a PyTorch path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bot.model import int4
from bot.model.kernels import build
from bot.model.kernels.layout import PackedInt4

ATTENTION_DIM_MULTIPLE = 16  # decode_attention's shapes (attention.cpp: kChunk, kLanes)
ATTENTION_MAX_HEADS_PER_GROUP = 16


def int4_linear(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for x [..., in] float32 or bfloat16, result in x's dtype.

    With the kernel, activations are quantized to int8 per row in blocks of 32 values, so the result
    differs from the float32 reference by the activation rounding (~0.5% relative, see the tests);
    without it the result is the float32 reference itself. No autograd.
    """
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise TypeError(f"x must be a float32 or bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise ValueError(f"x must have {w.in_features} features in its last dimension, got {tuple(x.shape)}")
    if bias is not None and bias.shape != (w.out_features,):
        raise ValueError(f"bias must be [{w.out_features}], got {tuple(bias.shape)}")
    rows = x.reshape(-1, w.in_features)
    module = build.kernel()
    if module is None:
        y = reference_linear(rows, w, bias).to(x.dtype)
    else:
        b = None if bias is None else bias.to(torch.float32).contiguous()
        y = module.int4_linear(rows.contiguous(), w.packed, w.scale, w.out_features, b)
    return y.view(*x.shape[:-1], w.out_features)


def attention_fits(heads: int, groups: int, dim: int) -> bool:
    """Whether attention.cpp takes these shapes (it checks them again and raises otherwise)."""
    per_group_fits = heads % groups == 0 and heads // groups <= ATTENTION_MAX_HEADS_PER_GROUP
    return dim % ATTENTION_DIM_MULTIPLE == 0 and per_group_fits


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    """One new token per row over bfloat16 caches: q [B, H, D], k/v [B, G, T, D] (contiguous; row b
    sees slots 0..positions[b]) -> [B, H, D] bfloat16, computed in float32 (attention.cpp). None where
    the compiled kernel is not in use or does not take the shapes (D a multiple of 16, at most 16
    query heads per group): the caller then runs PyTorch's path."""
    heads, dim, groups = q.shape[1], q.shape[2], k.shape[1]
    if not attention_fits(heads, groups, dim):
        return None
    module = build.kernel()
    if module is None:
        return None
    out: torch.Tensor = module.decode_attention(q.contiguous(), k, v, positions)
    return out


def _required() -> Any:
    module = build.kernel()
    if module is None:
        raise RuntimeError(f"the native kernels are not in use: {build.backend_name()}")
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of bfloat16 x [..., C] (C a multiple of 16) with a bfloat16 weight [C], in float32
    (pointwise.cpp); for bot/model/native_layers.py."""
    out: torch.Tensor = _required().rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps)
    return out.view(x.shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of bfloat16 x [..., 2F] = (gate, up), F a multiple of 16 -> [..., F]."""
    out: torch.Tensor = _required().swiglu(x.reshape(-1, x.shape[-1]).contiguous())
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


def rope_cache_write(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    rope: torch.Tensor,
    heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """In place on contiguous bfloat16 qkv [N, (H + 2G) * D]: RoPE on each query and key head (``rope``
    [T, P, 2] the (cos, sin) table), then token i's keys and values go to slot ``positions[i]`` of
    cache row ``rows[i]`` (caches [R, G, T, D])."""
    _required().rope_cache_write(qkv, positions, rows, rope, heads, k_cache, v_cache)


@dataclass(frozen=True, eq=False)
class DecodeLayer:
    """One transformer layer's tensors for ``make_decode_step``: bfloat16 norm weights, the layer's
    caches [R, G, T, D], and its qkv, dense, h_to_4h and 4h_to_h weights with their float32 biases."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    linears: tuple[tuple[PackedInt4, torch.Tensor | None], ...]


class DecodeStep(Protocol):
    def run(self, x: torch.Tensor, positions: torch.Tensor, first_row: int) -> torch.Tensor: ...


def make_decode_step(layers: list[DecodeLayer], rope: torch.Tensor, heads: int, eps: float) -> DecodeStep:
    """The compiled decode step over ``layers`` (decode_step.cpp; the caller checked ``attention_fits``).
    Its ``run(x [B, C], positions [B], first_row)`` gives what the layers' native modules give, bit for
    bit, in one call."""
    module = _required()
    empty = torch.empty(0)
    tensors, outs = [], []
    for layer in layers:
        if len(layer.linears) != 4:
            raise ValueError(
                f"a layer has 4 linears (qkv, dense, h_to_4h, 4h_to_h), got {len(layer.linears)}"
            )
        flat = [layer.input_norm, layer.post_norm, layer.k_cache, layer.v_cache]
        for weight, bias in layer.linears:
            flat += [weight.packed, weight.scale, empty if bias is None else bias]
        tensors.append(flat)
        outs.append([weight.out_features for weight, _ in layer.linears])
    step: DecodeStep = module.DecodeStep(tensors, outs, rope, heads, eps)
    return step


def reference_linear(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exact float32 result ``x @ (q * scale).T + bias`` for x [N, in], a chunk of rows at a time."""
    xf = x.to(torch.float32)
    y = torch.cat(
        [
            xf @ w.dequantize(start, min(start + int4.CHUNK_ROWS, w.out_features)).T
            for start in range(0, w.out_features, int4.CHUNK_ROWS)
        ],
        dim=1,
    )
    return y if bias is None else y + bias.to(torch.float32)
