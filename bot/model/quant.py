"""INT4 weight-only quantization in the official chatglm2-6b-int4 layout, and its matmul.

Checkpoint layout (per quantized linear): ``weight`` int8 ``[out, in/2]`` holding two signed 4-bit
values per byte (even column in the high nibble), ``weight_scale`` fp16 ``[out]``; the weight is
``q * scale``. Quantizing fp16 weights follows the official ``quantize(4)``: fp16 math,
``scale = max|w| / 7``, ``q = round(w / scale)``.

Runtime (``Int4Linear.prepare``), chosen by compute dtype, measured on this 2-core AVX512 CPU
(torch 2.13, 2 threads, 4096x27392 layer):
* bfloat16/float16 activations: PyTorch's packed int4 CPU kernel (``_weight_int4pack_mm_for_cpu``),
  ~3 ms for one token and ~87 ms for 64 tokens. The per-row scale is stored in every K-group with
  zero point 0, and the unsigned nibble is ``q + 8``: the kernel computes ``(u - 8) * scale + 0``,
  i.e. ``q * scale`` with the scale rounded to the activation dtype (the kernel wants scales in that
  dtype; bf16 keeps 8 of the fp16 scale's 11 mantissa bits). Dequantizing to bf16 + a plain GEMM was
  slower at every token count (~940 ms for 64 tokens) and ``_weight_int8pack_mm`` was 4x slower for
  one token, so neither is used. The kernel needs out_features % 16 == 0 and in_features % 32 == 0;
  other shapes use the dequantizing path.
* bfloat16 activations with the native kernel (``bot.model.kernels.native``, chosen by the loader):
  int8-quantized activations x int4 weights, at every token count. Measured (bench/kernel.py, 28
  layers, 2 threads): with AVX512-VNNI, one token ~72-90 ms vs ~146 ms for the int4pack kernel below,
  64 tokens ~1.0 s vs ~4.2 s (int4pack) and ~2.0 s (bf16 GEMM on dequantized weights); with AVX2 on
  a Zen 3 machine with half the memory bandwidth, one token ~161 ms vs ~522 ms (int4pack), 64 tokens
  ~3.9-4.2 s vs ~15.2 s (int4pack) and ~37.7 s (bf16). The activation rounding is the price:
  ~0.5 % relative per matmul (tests/model/test_fast_path.py bounds it).
* float32 activations: the exact reference ``x @ (q * scale).T`` in float32, which is what the
  official CPU int4 path computes (the packed kernel with fp32 activations is ~30x slower).
* CUDA (written, not exercised here: no GPU): dequantize to the activation dtype (fp16) per call and
  use cuBLAS, which is what the official GPU path does too (cpm_kernels extracts the fp16 weight, then
  a matmul), so no cpm_kernels dependency is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bot.model.kernels import native

_GROUP_SIZES = (128, 256, 64, 32)  # preference order for the packed kernel (128 measured fastest)
_ROW_MULTIPLE = 16  # the packed kernel needs out_features divisible by 16
_PACK_CHUNK_ROWS = 4096  # rows packed at once (a multiple of 64): bounds the temporaries


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``[out, in]`` -> (packed int8 ``[out, in/2]``, fp16 scale ``[out]``), official arithmetic."""
    if weight.dim() != 2 or weight.shape[1] % 2:
        raise ValueError(
            f"int4 quantization needs a 2-D weight with an even column count, got {weight.shape}"
        )
    packed = torch.empty(weight.shape[0], weight.shape[1] // 2, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float16)
    for start in range(0, weight.shape[0], _PACK_CHUNK_ROWS):  # rows at a time: bounded temporaries
        stop = start + _PACK_CHUNK_ROWS
        w16 = weight[start:stop].to(torch.float16)
        scale[start:stop] = w16.abs().max(dim=-1).values / 7  # fp16 math, as the official code
        q = torch.round(w16 / scale[start:stop, None]).nan_to_num_(0.0).to(torch.int8)  # 0/0 -> 0
        packed[start:stop] = pack_int4(q)
    return packed, scale


def quantize_int4_terms(weight: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as a sum of ``terms`` int4 matrices, stacked by rows: (int8 ``[terms*out, in/2]``,
    fp16 scale ``[terms*out]``). The first term is ``quantize_int4(weight)``; each next one quantizes
    what the previous ones left out. One per-row int4 term moves a weight by up to half a step
    (max|w| / 14, ~10 % of a row's spread); two terms shrink that ~14x, to about int8 precision, at
    twice the int4 bytes (still half of bf16). For the output layer, whose errors go straight into
    the logits."""
    rows, columns = weight.shape
    packed = torch.empty(terms, rows, columns // 2, dtype=torch.int8)
    scale = torch.empty(terms, rows, dtype=torch.float16)
    for start in range(0, rows, _PACK_CHUNK_ROWS):  # a chunk of rows at a time: bounded temporaries
        stop = start + _PACK_CHUNK_ROWS
        residual = weight[start:stop].to(torch.float32, copy=True)
        for term in range(terms):
            packed[term, start:stop], scale[term, start:stop] = quantize_int4(residual)
            residual -= dequantize_int4(packed[term, start:stop], scale[term, start:stop], torch.float32)
    return packed.view(terms * rows, columns // 2), scale.view(terms * rows)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] ``[out, in]`` -> int8 ``[out, in/2]`` (even column in the high nibble)."""
    return ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in/2]`` -> int8 ``[out, in]`` (signed 4-bit values, arithmetic shifts)."""
    high = packed >> 4
    low = (packed << 4) >> 4  # sign-extends the low nibble
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` as ``dtype`` (exact in float32: 4-bit times an fp16 scale)."""
    return (unpack_int4(packed).to(dtype) * scale.to(dtype)[:, None]).to(dtype)


def _group_size(in_features: int) -> int | None:
    return next((g for g in _GROUP_SIZES if in_features % g == 0), None)


def to_cpu_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """Official packed int8 ``[N, K/2]`` -> the uint8 ``[N, K/2]`` that ``_weight_int4pack_mm_for_cpu``
    reads, holding the unsigned values ``q + 8``.

    That format (``_convert_weight_to_int4pack_for_cpu``) tiles B rows, B = 64 on AVX512 builds and
    32 on AVX2: byte ``[tile, k, d]`` = ``u[B tile + d, k] | u[B tile + B/2 + d, k] << 4``. Where a
    probe confirms that layout and B divides N, it is built here with byte operations straight from
    the official bytes (``u = nibble ^ 8``), ~4x faster than unpacking to int32 for the op; otherwise
    the op itself converts.
    """
    rows = packed.shape[0]
    block = _native_block_rows()
    if block is None or rows % block:
        unsigned = unpack_int4(packed).to(torch.int32) + 8
        out: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        return out
    return _repack(packed, block)


def _repack(packed: torch.Tensor, block: int) -> torch.Tensor:
    rows, half = packed.shape
    tiles = packed.view(torch.uint8).view(rows // block, 2, block // 2, half).transpose(2, 3).contiguous()
    low_rows, high_rows = tiles[:, 0], tiles[:, 1]  # [tiles, K/2, B/2]: rows d and B/2 + d
    result = torch.empty(rows // block, half, 2, block // 2, dtype=torch.uint8)  # [.., (even, odd k), ..]
    torch.bitwise_or(low_rows >> 4, high_rows & 0xF0, out=result[:, :, 0])
    torch.bitwise_or(low_rows & 0x0F, high_rows << 4, out=result[:, :, 1])
    return result.bitwise_xor_(0x88).view(rows, half)


@functools.cache
def _native_block_rows() -> int | None:
    """The row tile of this machine's int4 pack format, found by converting a random probe both ways."""
    q = torch.randint(-8, 8, (128, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
    return next((b for b in (64, 32) if torch.equal(_repack(pack_int4(q), b), want)), None)


class PackedInt4Cpu:
    """The weight in PyTorch's packed int4 CPU format, with the per-row scale repeated per group."""

    def __init__(
        self, packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, group_size: int
    ) -> None:
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        self.weight = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        for start in range(0, out_features, _PACK_CHUNK_ROWS):
            stop = start + _PACK_CHUNK_ROWS
            self.weight[start:stop] = to_cpu_int4pack(packed[start:stop])
        groups = in_features // group_size
        scales_and_zeros = torch.zeros(groups, out_features, 2, dtype=dtype)  # [K/g, N, (scale, zero)]
        scales_and_zeros[:, :, 0] = scale.to(dtype)
        self.scales_and_zeros = scales_and_zeros
        self.group_size = group_size
        self.out_features = out_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, in]
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight, self.group_size, self.scales_and_zeros
        )
        return out.reshape(*x.shape[:-1], self.out_features)


def int4_matmul(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """``x @ (q * scale).T`` (no bias), through the fastest backend prepared for ``layer``."""
    if layer.packed_native is not None:
        return native.int4_linear(x, layer.packed_native)
    packed = layer.packed_cpu
    if packed is not None:
        return packed.matmul(x.to(packed.scales_and_zeros.dtype)).to(x.dtype)
    weight = dequantize_int4(layer.weight, layer.weight_scale, x.dtype)
    return torch.nn.functional.linear(x, weight)


class Int4Linear(nn.Module):
    """Drop-in for a bias-optional ``nn.Linear`` holding the official int4 tensors (same state-dict names).

    ``terms`` > 1 holds the weight as a sum of that many int4 matrices stacked by rows (see
    ``quantize_int4_terms``); the matmul computes all of them at once and adds the row blocks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: Any = None,
        terms: int = 1,
    ) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(f"int4 layers need an even in_features, got {in_features}")
        if terms < 1:
            raise ValueError(f"terms must be >= 1, got {terms}")
        self.in_features = in_features
        self.out_features = out_features
        self.terms = terms
        rows = terms * out_features
        self.register_buffer("weight", torch.empty(rows, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(rows, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.packed_cpu: PackedInt4Cpu | None = None
        self.packed_native: native.PackedInt4 | None = None
        self.native_bias: torch.Tensor | None = None  # float32, as the kernel adds it (cast once)

    weight: torch.Tensor
    weight_scale: torch.Tensor

    @property
    def backend(self) -> str:
        if self.packed_native is not None:
            return "native"
        return "packed-cpu" if self.packed_cpu is not None else "dequantize"

    def prepare(
        self,
        dtype: torch.dtype,
        release: Callable[[torch.Tensor], None] | None = None,
        *,
        use_native: bool = False,
    ) -> None:
        """Convert once for ``dtype`` activations (after the checkpoint tensors are loaded). A packed
        backend then drops the official tensors (they would double the weight memory), passing the
        packed int8 one to ``release`` first. ``use_native`` (the caller checked ``native.available()``)
        picks the native kernel for bfloat16 CPU activations; float32 stays the exact reference."""
        if self.backend != "dequantize" or self.weight.device.type != "cpu":
            return
        if use_native and dtype == torch.bfloat16:
            self.packed_native = native.PackedInt4.from_official(self.weight, self.weight_scale)
            self.native_bias = None if self.bias is None else self.bias.detach().float().contiguous()
            self._drop_official(release)
            return
        group = _group_size(self.in_features)
        if (
            group is not None
            and self.weight.shape[0] % _ROW_MULTIPLE == 0
            and dtype in (torch.bfloat16, torch.float16)
        ):
            self.packed_cpu = PackedInt4Cpu(self.weight, self.weight_scale, dtype, group)
            self._drop_official(release)

    def _drop_official(self, release: Callable[[torch.Tensor], None] | None) -> None:
        if release is not None:
            release(self.weight)
        self.weight = torch.empty(0, dtype=torch.int8)
        self.weight_scale = torch.empty(0, dtype=torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_native is not None and self.terms == 1:  # the kernel adds the bias itself
            return native.int4_linear(x, self.packed_native, self.native_bias)
        out = int4_matmul(x, self)
        if self.terms > 1:
            out = out.view(*out.shape[:-1], self.terms, self.out_features).sum(dim=-2)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        terms = f", terms={self.terms}" if self.terms > 1 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}{terms}, backend={self.backend}"
        )


def swap_linears_for_int4(
    module: nn.Module, names: tuple[str, ...], dtype: torch.dtype, terms: int = 1
) -> None:
    """Replace every ``nn.Linear`` child whose attribute name is in ``names`` by an ``Int4Linear``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, nn.Linear):
                device = child.weight.device
                layer = Int4Linear(
                    child.in_features, child.out_features, child.bias is not None, dtype, device, terms
                )
                setattr(parent, name, layer)


def prepare_int4(
    module: nn.Module,
    dtype: torch.dtype,
    release: Callable[[torch.Tensor], None] | None = None,
    *,
    use_native: bool = False,
) -> None:
    for child in module.modules():
        if isinstance(child, Int4Linear):
            child.prepare(dtype, release, use_native=use_native)


def int4_backends(module: nn.Module) -> list[str]:
    """The distinct backends of ``module``'s int4 layers, sorted (for logs and benchmarks)."""
    return sorted({child.backend for child in module.modules() if isinstance(child, Int4Linear)})
