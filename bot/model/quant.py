"""``Int4Linear``: a linear holding the official int4 tensors (bot/model/int4.py), swapped in for
``nn.Linear`` by name, and its matmul backends: one object per layer (``Int4Linear.backend``),
chosen once by ``prepare`` for the compute dtype.

* ``Dequantized`` (float32, CUDA, shapes the packed kernels do not take): ``x @ (q * scale).T`` in the
  activation dtype. In float32 that is exactly what the official CPU int4 path computes. On CUDA it
  is what the official GPU path does too (cpm_kernels extracts the fp16 weight, then a matmul).
* ``TorchInt4Pack`` (bfloat16/float16 on the CPU without the native kernel): PyTorch's packed int4
  kernel (``_weight_int4pack_mm_for_cpu``). The per-row scale is stored in every K-group with zero
  point 0 and the unsigned nibble is ``q + 8``, so it computes ``q * scale`` with the scale rounded to
  the activation dtype. It needs out_features % 16 == 0 and in_features % 32 == 0.
* ``NativeInt4`` (bfloat16 on the CPU where the loader picked the native kernel): int8-quantized
  activations x int4 weights (kernels/int4_native.cpp); the activation rounding is its price
  (tests/model/test_fast_path.py bounds it, bench/fidelity.py measures it). It adds the bias itself.

Why these and not others (dequantize + bf16 GEMM, ``_weight_int8pack_mm``): bot/model/README.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from bot.model import int4
from bot.model.kernels import layout, ops

_GROUP_SIZES = (128, 256, 64, 32)  # preference order for the packed kernel (128 is the fastest)
_ROW_MULTIPLE = 16  # the packed kernel needs out_features divisible by 16


class Int4Backend(Protocol):
    name: str

    def linear(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` for ``layer`` (every term summed)."""
        ...

    def nbytes(self, layer: Int4Linear) -> int:
        """Bytes of weight (and bias) one matmul reads."""
        ...


class Dequantized:
    """The reference: the layer's official tensors dequantized to the activation dtype per call."""

    name = "dequantize"

    def linear(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        weight = int4.dequantize(layer.weight, layer.weight_scale, x.dtype)
        return layer.sum_terms(torch.nn.functional.linear(x, weight))

    def nbytes(self, layer: Int4Linear) -> int:
        return layer.weight.nbytes + layer.weight_scale.nbytes + _bias_bytes(layer)


DEQUANTIZED = Dequantized()


class TorchInt4Pack:
    """The weight in PyTorch's packed int4 CPU format, with the per-row scale repeated per group."""

    name = "packed-cpu"

    def __init__(
        self, packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, group_size: int
    ) -> None:
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        self.weight = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        for start in range(0, out_features, int4.CHUNK_ROWS):
            stop = start + int4.CHUNK_ROWS
            self.weight[start:stop] = to_cpu_int4pack(packed[start:stop])
        groups = in_features // group_size
        scales_and_zeros = torch.zeros(groups, out_features, 2, dtype=dtype)  # [K/g, N, (scale, zero)]
        scales_and_zeros[:, :, 0] = scale.to(dtype)
        self.scales_and_zeros = scales_and_zeros
        self.group_size = group_size
        self.out_features = out_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.scales_and_zeros.dtype)  # [N, in]
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight, self.group_size, self.scales_and_zeros
        )
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def linear(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        return layer.sum_terms(self.matmul(x))

    def nbytes(self, layer: Int4Linear) -> int:
        return self.weight.nbytes + self.scales_and_zeros.nbytes + _bias_bytes(layer)


class NativeInt4:
    """The weight in the native kernel's layout, with the bias in float32 as the kernel adds it."""

    name = "native"

    def __init__(self, weight: layout.PackedInt4, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias

    def linear(self, layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.terms == 1:  # the kernel adds the bias itself
            return ops.int4_linear(x, self.weight, self.bias)
        return layer.sum_terms(ops.int4_linear(x, self.weight))

    def nbytes(self, layer: Int4Linear) -> int:
        return self.weight.packed.nbytes + self.weight.scale.nbytes + _bias_bytes(layer)


def _bias_bytes(layer: Int4Linear) -> int:
    return layer.bias.nbytes if layer.bias is not None else 0


def to_cpu_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """Official packed int8 ``[N, K/2]`` -> the uint8 ``[N, K/2]`` that ``_weight_int4pack_mm_for_cpu``
    reads, holding the unsigned values ``q + 8``.

    That format (``_convert_weight_to_int4pack_for_cpu``) tiles B rows, B = 64 on AVX512 builds and
    32 on AVX2: byte ``[tile, k, d]`` = ``u[B tile + d, k] | u[B tile + B/2 + d, k] << 4``. Where a
    probe confirms that layout and B divides N, it is built here with byte operations straight from
    the official bytes (``u = nibble ^ 8``); otherwise the op itself converts.
    """
    rows = packed.shape[0]
    block = _native_block_rows()
    if block is None or rows % block:
        unsigned = int4.unpack(packed).to(torch.int32) + 8
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
    return next((b for b in (64, 32) if torch.equal(_repack(int4.pack(q), b), want)), None)


def _group_size(in_features: int) -> int | None:
    return next((g for g in _GROUP_SIZES if in_features % g == 0), None)


class Int4Linear(nn.Module):
    """Drop-in for a bias-optional ``nn.Linear`` holding the official int4 tensors (same state-dict names).

    ``terms`` > 1 holds the weight as a sum of that many int4 matrices stacked by rows (see
    ``int4.quantize_terms``); the matmul computes all of them at once and adds the row blocks."""

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
        self.backend: Int4Backend = DEQUANTIZED

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def prepare(
        self,
        dtype: torch.dtype,
        release: Callable[[torch.Tensor], None] | None = None,
        *,
        use_native: bool = False,
    ) -> None:
        """Pick the backend once for ``dtype`` activations (after the checkpoint tensors are loaded). A
        packed backend then drops the official tensors (they would double the weight memory), passing
        the packed int8 one to ``release`` first. ``use_native`` (the caller checked
        ``build.available()``) picks the native kernel for bfloat16 CPU activations."""
        if self.backend is not DEQUANTIZED or self.weight.device.type != "cpu":
            return
        if use_native and dtype == torch.bfloat16:
            bias = None if self.bias is None else self.bias.detach().float().contiguous()
            self.backend = NativeInt4(layout.PackedInt4.from_official(self.weight, self.weight_scale), bias)
        else:
            group = _group_size(self.in_features)
            packs = self.weight.shape[0] % _ROW_MULTIPLE == 0 and dtype in (torch.bfloat16, torch.float16)
            if group is None or not packs:
                return
            self.backend = TorchInt4Pack(self.weight, self.weight_scale, dtype, group)
        if release is not None:
            release(self.weight)
        self.weight = torch.empty(0, dtype=torch.int8)
        self.weight_scale = torch.empty(0, dtype=torch.float16)

    def sum_terms(self, out: torch.Tensor) -> torch.Tensor:
        """``[..., terms * out]`` matmul rows -> ``[..., out]`` with the bias added."""
        if self.terms > 1:
            out = out.view(*out.shape[:-1], self.terms, self.out_features).sum(dim=-2)
        return out + self.bias if self.bias is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(self, x)

    def extra_repr(self) -> str:
        terms = f", terms={self.terms}" if self.terms > 1 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}{terms}, "
            f"backend={self.backend.name}"
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
    return sorted({child.backend.name for child in module.modules() if isinstance(child, Int4Linear)})
