"""native_layers.py: the swapped-in modules give the reference modules' outputs (within one bfloat16
rounding, as their steps run in float32), share their tensors, and swap back to the same bits."""

from __future__ import annotations

import pytest
import torch

from bot.model.model import MLP, Attention, ChatGLM2, RMSNorm
from bot.model.native_layers import (
    NativeAttention,
    NativeDecodeAttention,
    NativeFusedDecoder,
    NativeMLP,
    NativeRMSNorm,
    use_native_layers,
)
from tests.model.fixture import require_native_kernel
from tests.model.test_pointwise import BF16_STEP, batched_decode, randn, tiny_model


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    require_native_kernel()


def layer_types(model: ChatGLM2) -> set[type]:
    return {type(m) for block in model.blocks for m in block.children()} | {
        type(model.transformer.encoder.final_layernorm)
    }


def test_swapping_in_and_back_keeps_the_tensors_and_the_bits() -> None:
    fresh = tiny_model(torch.bfloat16)
    assert not use_native_layers(fresh, pointwise=False)
    want = batched_decode(fresh)
    model = tiny_model(torch.bfloat16)
    tensors = {name: t.data_ptr() for name, t in model.state_dict().items()}
    assert use_native_layers(model)
    assert layer_types(model) == {NativeRMSNorm, NativeAttention, NativeMLP}
    assert isinstance(model.fused_decoder, NativeFusedDecoder)
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == tensors
    assert not use_native_layers(model, pointwise=False)
    assert layer_types(model) == {RMSNorm, NativeDecodeAttention, MLP} and model.fused_decoder is None
    assert torch.equal(batched_decode(model), want)


def test_float32_keeps_the_reference_modules() -> None:
    model = tiny_model(torch.float32)
    want = batched_decode(model)
    assert not use_native_layers(model)
    assert layer_types(model) == {RMSNorm, Attention, MLP} and model.fused_decoder is None
    assert torch.equal(batched_decode(model), want)


def close(got: torch.Tensor, want: torch.Tensor, roundings: float = 2.0) -> bool:
    """Within ``roundings`` bfloat16 roundings of the reference (relative to the row's scale)."""
    scale = want.float().abs().amax(dim=-1, keepdim=True)
    return bool(((got.float() - want.float()).abs() <= roundings * BF16_STEP * scale).all())


def test_each_swapped_module_gives_the_reference_modules_output() -> None:
    reference, model = tiny_model(torch.bfloat16), tiny_model(torch.bfloat16)
    assert use_native_layers(model)
    x = randn(2, 5, 64, seed=9).bfloat16()
    for want, got in zip(reference.blocks, model.blocks, strict=True):
        assert isinstance(got.input_layernorm, NativeRMSNorm) and isinstance(got.mlp, NativeMLP)
        assert close(got.input_layernorm(x), want.input_layernorm(x), roundings=1)
        h = want.mlp.dense_h_to_4h(x)
        assert close(got.mlp.swiglu(h), want.mlp.swiglu(h), roundings=1)
        assert close(got.mlp(x), want.mlp(x), roundings=4)


@pytest.mark.parametrize("attention", [NativeAttention, NativeDecodeAttention])
def test_swapped_attention_prefills_and_decodes_as_the_reference(attention: type[Attention]) -> None:
    outputs = {}
    for kind in (Attention, attention):
        model = tiny_model(torch.bfloat16)
        for block in model.blocks:
            block.self_attention.__class__ = kind  # only the attention differs between the runs
        outputs[kind] = batched_decode(model)
    assert close(outputs[attention], outputs[Attention], roundings=8)
    assert (outputs[attention].argmax(-1) == outputs[Attention].argmax(-1)).float().mean() >= 0.75
