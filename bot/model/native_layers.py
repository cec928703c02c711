"""The compiled layers of a bfloat16 CPU model, swapped in for model.py's reference modules.

Each subclass overrides only the step it compiles and adds no state, so a swap (``use_native_layers``)
is a new module object over the same parameters, buffers and children, and it swaps back the same way.

* ``NativeDecodeAttention``: one new token per row through attention.cpp over the bfloat16 caches,
  with no float32 copies of K and V (where the shapes fit; else the reference).
* ``NativeAttention``: that, plus RoPE with the cache write as one compiled call (pointwise.cpp).
* ``NativeRMSNorm``, ``NativeMLP`` (SwiGLU): one compiled call each, in float32 with one rounding per
  output instead of one per PyTorch op.
* ``NativeFusedDecoder``: where every linear of every layer is on the native int4 kernel, a decode step
  runs all the layers in one compiled call (decode_step.cpp) with the same kernels in the same order
  as the modules above: the same bits, without the Python between them.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from bot.model.kernels import build, layout, ops
from bot.model.model import MLP, Attention, Block, ChatGLM2, RMSNorm, Step
from bot.model.quant import Int4Linear, NativeInt4

_SIZE_MULTIPLE = 16  # pointwise.cpp's vectors: hidden and MLP sizes must be multiples


class NativeRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class NativeMLP(MLP):
    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        return ops.swiglu(h)


class NativeDecodeAttention(Attention):
    def attend(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, step: Step) -> torch.Tensor:
        batch, _, seq, _ = q.shape
        if seq == 1:
            flat = ops.decode_attention(
                q.reshape(batch, self.n_heads, self.head_dim), k_all, v_all, step.input_pos[:, 0]
            )
            if flat is not None:  # [B, H, D]: with one token, already [B, S, H * D] in memory
                return flat.view(batch, seq, self.q_size)
        return super().attend(q, k_all, v_all, step)


class NativeAttention(NativeDecodeAttention):
    def rope_and_cache(self, qkv: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, _ = qkv.shape
        cache = self.cache()
        ops.rope_cache_write(
            qkv.view(batch * seq, -1),
            step.input_pos.reshape(-1),
            step.cache_rows,
            step.rope,
            self.n_heads,
            cache.k_cache,
            cache.v_cache,
        )
        rows_used = slice(step.first_row, step.first_row + batch)
        return cache.k_cache[rows_used], cache.v_cache[rows_used]


class NativeFusedDecoder:
    """``model.fused_decoder``: the compiled decode step over the model's layers. The step holds the
    caches, so it is compiled on first use and again after ``setup_caches`` (a new RoPE table)."""

    def __init__(self, model: ChatGLM2) -> None:
        self._model = model
        self._rope: torch.Tensor | None = None
        self._step: ops.DecodeStep | None = None

    @classmethod
    def for_model(cls, model: ChatGLM2) -> NativeFusedDecoder | None:
        """None unless every linear is on the native kernel (one term) and attention.cpp takes the
        shapes."""
        config = model.config
        if not ops.attention_fits(config.num_attention_heads, config.kv_groups, config.head_dim):
            return None
        linears = [linear for block in model.blocks for linear in _linears(block)]
        if not all(_native_weight(linear) is not None for linear in linears):
            return None
        return cls(model)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, first_row: int) -> torch.Tensor:
        model = self._model
        if self._step is None or self._rope is not model.rope:
            self._step, self._rope = self._compile(model), model.rope
        return self._step.run(x, positions, first_row)

    @staticmethod
    def _compile(model: ChatGLM2) -> ops.DecodeStep:
        layers = []
        for block in model.blocks:
            cache = block.self_attention.cache()
            weights = tuple(_native_weight(linear) for linear in _linears(block))
            layers.append(
                ops.DecodeLayer(
                    block.input_layernorm.weight,
                    block.post_attention_layernorm.weight,
                    cache.k_cache,
                    cache.v_cache,
                    tuple(weight for weight in weights if weight is not None),
                )
            )
        heads, eps = model.config.num_attention_heads, model.config.layernorm_epsilon
        return ops.make_decode_step(layers, model.rope, heads, eps)


def _linears(block: Block) -> tuple[nn.Module, ...]:
    attention, mlp = block.self_attention, block.mlp
    return (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)


def _native_weight(layer: nn.Module) -> tuple[layout.PackedInt4, torch.Tensor | None] | None:
    """An int4 linear's weight and float32 bias as the compiled decode step takes them, or None."""
    if isinstance(layer, Int4Linear) and isinstance(layer.backend, NativeInt4) and layer.terms == 1:
        return layer.backend.weight, layer.backend.bias
    return None


M = TypeVar("M", bound=nn.Module)


def _as(module: nn.Module, cls: type[M]) -> M:
    """A ``cls`` over ``module``'s parameters, buffers and children (the classes differ only in code)."""
    swapped = cls.__new__(cls)
    swapped.__dict__.update(module.__dict__)
    return swapped


def use_native_layers(model: ChatGLM2, pointwise: bool = True, *, fused_decode: bool = True) -> bool:
    """Swap the compiled layers in where they serve ``model`` (bfloat16 on the CPU, kernels built);
    elsewhere swap the reference modules back. There, attention always decodes through attention.cpp;
    ``pointwise`` also compiles RMSNorm, SwiGLU and RoPE with the cache write where the hidden and MLP
    sizes are multiples of 16, and ``fused_decode`` then runs decode steps as one call where every
    linear is on the native kernel. Returns whether the pointwise layers are compiled now."""
    config = model.config
    kernels = model.compute_dtype == torch.bfloat16 and model.device.type == "cpu" and build.available()
    sizes_fit = config.hidden_size % _SIZE_MULTIPLE == 0 and config.ffn_hidden_size % _SIZE_MULTIPLE == 0
    on = kernels and pointwise and sizes_fit
    norm: type[RMSNorm] = NativeRMSNorm if on else RMSNorm
    attention: type[Attention] = NativeAttention if on else NativeDecodeAttention if kernels else Attention
    for block in model.blocks:
        block.input_layernorm = _as(block.input_layernorm, norm)
        block.post_attention_layernorm = _as(block.post_attention_layernorm, norm)
        block.self_attention = _as(block.self_attention, attention)
        block.mlp = _as(block.mlp, NativeMLP if on else MLP)
    encoder = model.transformer.encoder
    encoder.final_layernorm = _as(encoder.final_layernorm, norm)
    model.fused_decoder = NativeFusedDecoder.for_model(model) if on and fused_decode else None
    return on
