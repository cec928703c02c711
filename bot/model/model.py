"""ChatGLM2-6B in plain PyTorch (gpt-fast style): pre-norm RMSNorm blocks, multi-query attention with
RoPE on the first half of each head (interleaved pairs), SwiGLU MLP, untied output layer.

This is the one reference forward. Faster paths are swapped in as modules, never as flags here:
``Int4Linear`` for the quantized linears (quant.py), the compiled layers of native_layers.py, and a
``fused_decoder`` that runs a whole decode step in one compiled call. float32 is the exact reference.

Module names mirror the official checkpoint (``transformer.encoder.layers.N.self_attention...``) so a
state dict loads without renaming. Shapes: B batch, S new tokens, T cache length, H heads, G key/value
groups, D head dim, C hidden size, R rotary dims.

The KV cache is written by position (slot == position), and ``forward`` takes a position per token and
row (``input_pos [B, S]``; ``[S]`` is shared by all rows). Attention masks key slot ``t`` for a query at
position ``p`` unless ``t <= p``, so rows at different positions can decode together. ``first_row``
picks which cache rows a forward uses (rows ``first_row .. first_row + B - 1``), so one request can be
prefilled into its own row while other rows hold other requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from bot.model.config import ChatGLM2Config
from bot.model.kv_cache import KVCache
from bot.model.quant import swap_linears_for_int4

QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ROPE_BASE = 10000.0
# x [B, C], positions [B], first_row -> x [B, C] after every layer: one decode step (native_layers.py)
FusedDecoder = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32, as the official ``weight * (x * rsqrt(mean(x^2) + eps))``; the in-place steps give the
        # same bits with fewer temporaries (products commute exactly).
        xf = x.to(torch.float32)
        variance = xf.pow(2).mean(-1, keepdim=True).add_(self.eps)
        return (xf * variance.rsqrt_()).mul_(self.weight).to(x.dtype)


def rope_cache(max_seq_len: int, rotary_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[T, R/2, 2]``: (cos, sin) per position and pair, computed in fp32 as the official code."""
    theta = 1.0 / (ROPE_BASE ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), theta)
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).to(dtype)


def rope_factors(rope: torch.Tensor) -> torch.Tensor:
    """``rope [B, S, R/2, 2]`` -> ``[2, B, S, 1, R/2, 2]``: per pair (cos, cos) and (-sin, sin), so that
    ``pairs * f[0] + pairs.flip(-1) * f[1]`` rotates each pair (x[2i], x[2i+1]) by its angle."""
    cos, sin = rope[..., 0], rope[..., 1]
    factors = torch.stack((torch.stack((cos, cos), dim=-1), torch.stack((-sin, sin), dim=-1)))
    return factors.unsqueeze(3)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one new token per row: q [B, H, 1, D], k/v [B, G, T, D], mask [B, 1, 1, T]
    (None: every slot is seen).

    Two float32 matmuls per group (query head h reads group h // (H / G), as SDPA's enable_gqa): on the
    CPU far cheaper than SDPA's flash kernel for a single query (bot/model/README.md).
    """
    batch, heads, _, dim = q.shape
    groups = k.shape[1]
    grouped = q.reshape(batch, groups, heads // groups, dim).float()
    scores = torch.matmul(grouped, k.float().transpose(-1, -2)).mul_(dim**-0.5)  # [B, G, H/G, T]
    if mask is not None:
        scores.masked_fill_(~mask.view(batch, 1, 1, -1), -float("inf"))
    out = torch.matmul(scores.softmax(dim=-1), v.float())  # [B, G, H/G, D]
    return out.reshape(batch, heads, 1, dim).to(q.dtype)


@dataclass(frozen=True)
class Step:
    """What every layer of one forward shares: ``input_pos`` [B, S]; ``mask`` [B, 1, S, T], or None when
    every query sees every one of the ``length`` (T) slots it can see (one row, one token); cache rows
    ``first_row ..``; ``rope`` the (cos, sin) table [max_seq_len, R/2, 2]. What a layer derives from
    them is made once per forward, on first use."""

    input_pos: torch.Tensor
    mask: torch.Tensor | None
    length: int
    first_row: int
    rope: torch.Tensor

    @cached_property
    def rope_factors(self) -> torch.Tensor:
        """``rope_factors`` of the tokens' positions: [2, B, S, 1, R/2, 2]."""
        return rope_factors(self.rope[self.input_pos])

    @cached_property
    def cache_rows(self) -> torch.Tensor:
        """Each token's cache row, [B * S]."""
        batch, seq = self.input_pos.shape
        return torch.arange(self.first_row, self.first_row + batch).repeat_interleave(seq)


class Attention(nn.Module):
    def __init__(self, config: ChatGLM2Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_groups = config.kv_groups
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        qkv = config.q_size + 2 * config.kv_size
        self.query_key_value = nn.Linear(config.hidden_size, qkv, bias=config.add_qkv_bias, dtype=dtype)
        self.dense = nn.Linear(config.q_size, config.hidden_size, bias=False, dtype=dtype)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        batch, seq, _ = x.shape  # [B, S, C]
        qkv = self.query_key_value(x)  # [B, S, (H + 2G) * D], a fresh tensor: RoPE rotates it in place
        k_all, v_all = self.rope_and_cache(qkv, step)  # [B, G, T, D]
        q = qkv[..., : self.q_size].view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        out = self.attend(q, k_all, v_all, step)  # [B, S, H * D]
        projected: torch.Tensor = self.dense(out)
        return projected  # [B, S, C]

    def cache(self) -> KVCache:
        if self.kv_cache is None:
            raise RuntimeError("call setup_caches() before forward()")
        return self.kv_cache

    def rope_and_cache(self, qkv: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on the query and key heads of ``qkv`` [B, S, (H + 2G) * D] in place, keys and values
        into the cache; returns the B rows of the cache, [B, G, T, D] each."""
        batch, seq, _ = qkv.shape
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        factors = step.rope_factors  # [2, B, S, 1, R/2, 2]
        rot_dim = factors.shape[-2] * 2
        heads = qkv[..., :k_end].view(batch, seq, self.n_heads + self.n_groups, self.head_dim)
        pairs = heads[..., :rot_dim].view(batch, seq, -1, rot_dim // 2, 2)  # [B, S, H+G, R/2, 2]
        pairs.copy_(pairs * factors[0] + pairs.flip(-1) * factors[1])
        k = qkv[..., q_end:k_end].view(batch, seq, self.n_groups, self.head_dim)  # [B, S, G, D]
        v = qkv[..., k_end:].view(batch, seq, self.n_groups, self.head_dim)
        return self.cache().update(
            step.input_pos, k.transpose(1, 2), v.transpose(1, 2), step.first_row, step.length - 1
        )

    def attend(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, step: Step) -> torch.Tensor:
        """q [B, H, S, D] over the first ``step.length`` slots of k/v [B, G, T, D] -> [B, S, H * D]."""
        batch, _, seq, _ = q.shape
        k_seen, v_seen = k_all[:, :, : step.length], v_all[:, :, : step.length]
        if seq == 1:
            out = decode_attention(q, k_seen, v_seen, step.mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k_seen, v_seen, attn_mask=step.mask, enable_gqa=True
            )  # query head h reads group h // (H / G); scale 1/sqrt(D)
        return out.transpose(1, 2).reshape(batch, seq, self.q_size)


class MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(
            config.hidden_size, 2 * config.ffn_hidden_size, bias=False, dtype=dtype
        )
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dense_4h_to_h(self.swiglu(self.dense_h_to_4h(x)))  # [B, S, 2F] -> [B, S, C]
        return out

    def swiglu(self, h: torch.Tensor) -> torch.Tensor:
        """[..., 2F] -> [..., F]: the first half gates the second."""
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, config: ChatGLM2Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.self_attention = Attention(config, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.mlp = MLP(config, dtype)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), step)
        mlp_out: torch.Tensor = self.mlp(self.post_attention_layernorm(x))
        return x + mlp_out


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # The loader builds the model on the meta device and assigns the checkpoint's tensors, so the
        # random init is skipped (on meta, normal_ alone costs seconds of one-off imports).
        shape = (config.padded_vocab_size, config.hidden_size)
        self.word_embeddings = nn.Embedding(*shape, _weight=torch.empty(shape, dtype=dtype))


class Encoder(nn.Module):
    def __init__(self, config: ChatGLM2Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(config, dtype) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype)


class Transformer(nn.Module):
    def __init__(self, config: ChatGLM2Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.embedding = Embedding(config, dtype)
        self.encoder = Encoder(config, dtype)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False, dtype=dtype)


class ChatGLM2(nn.Module):
    def __init__(
        self, config: ChatGLM2Config, dtype: torch.dtype | None = None, quantized: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, dtype)
        if quantized:
            swap_linears_for_int4(self.transformer.encoder, QUANTIZED_LINEARS, dtype or torch.float32)
        self.max_batch = 0
        self.max_seq_len = 0
        self.rope = torch.empty(0, device="cpu")  # [T, R/2, 2], made by setup_caches
        self.fused_decoder: FusedDecoder | None = None  # set by native_layers.use_native_layers

    @property
    def device(self) -> torch.device:
        return self.transformer.output_layer.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.encoder.final_layernorm.weight.dtype

    @property
    def blocks(self) -> list[Block]:
        return [layer for layer in self.transformer.encoder.layers if isinstance(layer, Block)]

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV caches (zeroed) and the RoPE table for ``max_seq_len`` positions."""
        dtype = dtype or self.compute_dtype
        config = self.config
        for block in self.blocks:
            block.self_attention.kv_cache = KVCache(
                max_batch, max_seq_len, config.kv_groups, config.head_dim, dtype
            ).to(self.device)
        self.rope = rope_cache(max_seq_len, config.rotary_dim, dtype).to(self.device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor,
        *,
        last_only: bool = False,
        first_row: int = 0,
    ) -> torch.Tensor:
        """input_ids [B, S], input_pos [S] or [B, S] -> float32 logits [B, S, V] ([B, 1, V] if last_only).

        Uses cache rows ``first_row .. first_row + B - 1``."""
        batch, seq = input_ids.shape
        if input_pos.dim() == 1:
            input_pos = input_pos.expand(batch, seq)
        last = int(input_pos.max())
        if first_row < 0 or first_row + batch > self.max_batch or last >= self.max_seq_len:
            raise ValueError(
                f"rows {first_row}..{first_row + batch - 1} / position {last} exceed the caches "
                f"({self.max_batch} x {self.max_seq_len}); call setup_caches() with larger sizes"
            )
        x = self.transformer.embedding.word_embeddings(input_ids).to(self.rope.dtype)  # [B, S, C]
        if seq == 1 and self.fused_decoder is not None:  # every layer in one call
            positions = input_pos[:, 0].contiguous()  # [B]
            x = self.fused_decoder(x.view(batch, -1), positions, first_row).view(batch, 1, -1)
        else:
            mask = None  # one row, one token at the newest position: it sees every slot 0..last
            if batch > 1 or seq > 1:
                slots = torch.arange(last + 1, device=input_pos.device)
                mask = (slots[None, None, :] <= input_pos[:, :, None])[:, None]  # [B, 1, S, T]
            step = Step(input_pos, mask, last + 1, first_row, self.rope)
            for block in self.blocks:
                x = block(x, step)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.encoder.final_layernorm(x)
        logits: torch.Tensor = self.transformer.output_layer(x)
        return logits.float()  # [B, S, V]

    def caches(self) -> list[KVCache]:
        return [block.self_attention.cache() for block in self.blocks]
