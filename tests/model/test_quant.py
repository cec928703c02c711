"""Int4Linear's backends: the packed CPU kernel against the dequantized reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bot.model import quant
from bot.model.int4 import dequantize as dequantize_int4
from bot.model.int4 import pack as pack_int4
from bot.model.int4 import quantize as quantize_int4
from bot.model.int4 import unpack as unpack_int4
from bot.model.quant import Int4Linear, TorchInt4Pack, to_cpu_int4pack


def random_layer(out: int, in_features: int, bias: bool, seed: int) -> tuple[Int4Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    packed, scale = quantize_int4(torch.randn(out, in_features, generator=gen).half())
    layer = Int4Linear(in_features, out, bias, torch.float32)
    layer.weight, layer.weight_scale = packed, scale
    if layer.bias is not None:
        layer.bias.data = torch.randn(out, generator=gen)
    return layer, dequantize_int4(packed, scale, torch.float32)


@pytest.mark.parametrize(
    ("out", "in_features", "tokens"),
    [(64, 64, 1), (96, 128, 3), (256, 384, 17), (48, 13696 // 4, 2), (80, 96, 5)],
)
def test_packed_kernel_matches_dequantized_reference(out: int, in_features: int, tokens: int) -> None:
    layer, weight = random_layer(out, in_features, bias=True, seed=out + in_features)
    x = torch.randn(tokens, in_features)
    assert layer.bias is not None
    reference = x @ weight.T + layer.bias
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)  # float32: dequantize path
    layer.prepare(torch.bfloat16)
    assert isinstance(layer.backend, TorchInt4Pack)
    assert layer.weight.numel() == 0  # the official tensors are released once packed
    got = layer(x.bfloat16()).float()
    # bf16 activations and output (8-bit mantissa): reference from the same bf16-rounded input,
    # tolerance ~ 1% of the output scale
    ref_bf16 = x.bfloat16().float() @ weight.T + layer.bias
    scale = ref_bf16.abs().max()
    assert (got - ref_bf16).abs().max() <= 0.02 * scale


def test_packed_kernel_reads_back_q_times_scale() -> None:
    """q + 8 with zero point 0 and the row scale in every group gives q * scale, with the scale
    rounded to the activation dtype (the kernel wants bf16 scales for bf16 activations)."""
    layer, _ = random_layer(128, 256, bias=False, seed=7)
    q, scale = unpack_int4(layer.weight).float(), layer.weight_scale.bfloat16().float()
    layer.prepare(torch.bfloat16)
    assert isinstance(layer.backend, TorchInt4Pack)
    x = torch.zeros(256, 256, dtype=torch.bfloat16)
    x.fill_diagonal_(1.0)  # identity input reads the weight back (transposed)
    recovered = layer.backend.matmul(x).float().T
    torch.testing.assert_close(recovered, (q * scale[:, None]).bfloat16().float(), atol=0, rtol=0)


def test_float32_input_to_packed_layer_is_cast() -> None:
    layer, weight = random_layer(64, 64, bias=False, seed=3)
    layer.prepare(torch.bfloat16)
    x = torch.randn(2, 64)
    out = layer(x)
    assert out.dtype == torch.float32
    assert (out - x @ weight.T).abs().max() <= 0.02 * (x @ weight.T).abs().max()


@pytest.mark.parametrize(("out", "in_features"), [(16, 22), (40, 64)])
def test_shapes_the_kernel_refuses_fall_back_to_dequantize(out: int, in_features: int) -> None:
    # 22: no multiple of any group size; 40 rows: the kernel needs a multiple of 16
    layer, weight = random_layer(out, in_features, bias=False, seed=1)
    layer.prepare(torch.bfloat16)
    assert layer.backend is quant.DEQUANTIZED
    x = torch.randn(3, in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), (x.float() @ weight.T).bfloat16(), atol=0.05, rtol=0.02)


def test_odd_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        Int4Linear(3, 2, False, torch.float32)


@pytest.mark.parametrize(("out", "in_features"), [(64, 64), (192, 256), (4160, 128), (80, 96)])
def test_direct_repacking_equals_the_torch_conversion_op(out: int, in_features: int) -> None:
    q = torch.randint(
        -8, 8, (out, in_features), dtype=torch.int8, generator=torch.Generator().manual_seed(out)
    )
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
    assert torch.equal(to_cpu_int4pack(pack_int4(q)), want)


PORTABILITY_CHECK = """
import torch
from bot.model.int4 import dequantize as dequantize_int4, pack as pack_int4, quantize as quantize_int4
from bot.model.quant import Int4Linear, TorchInt4Pack, _native_block_rows, to_cpu_int4pack
q = torch.randint(-8, 8, (192, 256), dtype=torch.int8)
want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
assert torch.equal(to_cpu_int4pack(pack_int4(q)), want)
packed, scale = quantize_int4(torch.randn(192, 256).half())
layer = Int4Linear(256, 192, False, torch.bfloat16)
layer.weight, layer.weight_scale = packed, scale
x = torch.randn(3, 256)
ref = x.bfloat16().float() @ dequantize_int4(packed, scale, torch.float32).T
layer.prepare(torch.bfloat16)
assert isinstance(layer.backend, TorchInt4Pack)
assert (layer(x.bfloat16()).float() - ref).abs().max() <= 0.02 * ref.abs().max()
print(torch.backends.cpu.get_cpu_capability(), _native_block_rows())
"""


@pytest.mark.parametrize(("capability", "block"), [("avx2", "32"), ("default", "None")])
def test_repacking_follows_the_cpu_capability(capability: str, block: str) -> None:
    """The packed layout differs per CPU build (64-row tiles on AVX512, 32 on AVX2, other without
    SIMD): the probe picks the matching one or leaves the conversion to the op."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run(
        [sys.executable, "-c", PORTABILITY_CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == block
