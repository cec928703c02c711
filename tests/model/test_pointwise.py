"""The compiled per-token steps (pointwise.cpp): RMSNorm, SwiGLU, RoPE with the cache write. Each is
within one bfloat16 rounding of float32 math on the same inputs, independent of the batch, and a model
with the native layers swapped in stays close to PyTorch's path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bot.model.config import ChatGLM2Config
from bot.model.int4 import quantize as quantize_int4
from bot.model.kernels import ops
from bot.model.model import ChatGLM2, RMSNorm, rope_cache
from bot.model.native_layers import (
    NativeAttention,
    NativeMLP,
    NativeRMSNorm,
    use_native_layers,
)
from bot.model.quant import DEQUANTIZED, Int4Linear, prepare_int4
from tests.model.fixture import require_native_kernel
from tests.model.reference_ops import apply_rope

BF16_STEP = 2.0**-7  # bfloat16's relative spacing: its rounding moves a value by at most half of it
TINY = ChatGLM2Config(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    kv_channels=16,
    multi_query_group_num=2,
    ffn_hidden_size=128,
    padded_vocab_size=300,
)


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    require_native_kernel()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def within_one_rounding(got: torch.Tensor, want: torch.Tensor, slack: float = 1e-6) -> bool:
    return bool(((got.float() - want).abs() <= BF16_STEP * want.abs() + slack).all())


def test_rms_norm_is_one_rounding_of_float32_math_and_per_row() -> None:
    x, weight = randn(5, 4096, seed=0, scale=3).bfloat16(), (1 + randn(4096, seed=1, scale=0.1)).bfloat16()
    got = ops.rms_norm(x, weight, 1e-5)
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()
    assert got.dtype == torch.bfloat16 and within_one_rounding(got, want)
    alone = torch.cat([ops.rms_norm(x[i : i + 1], weight, 1e-5) for i in range(5)])
    assert torch.equal(got, alone)


def test_rms_norm_module_takes_it_when_swapped_in() -> None:
    norm = RMSNorm(64, 1e-5, torch.bfloat16)
    norm.weight.data = (1 + randn(64, seed=2, scale=0.1)).bfloat16()
    x = randn(2, 3, 64, seed=3).bfloat16()
    torch_path = norm(x)
    swapped = NativeRMSNorm(64, 1e-5, torch.bfloat16)
    swapped.weight.data = norm.weight.data
    got = swapped(x)
    assert got.shape == x.shape
    assert ((got.float() - torch_path.float()).abs() <= BF16_STEP * torch_path.float().abs()).all()


def test_swiglu_is_one_rounding_of_float32_math_even_for_large_gates() -> None:
    x = randn(3, 2 * 272, seed=4, scale=4)
    x[0, :16] = torch.tensor([-100.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 100.0, 1e4] + [-1e4] * 6)
    x = x.bfloat16()
    got = ops.swiglu(x)
    gate, up = x.float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert got.shape == (3, 272) and torch.isfinite(got.float()).all()
    assert within_one_rounding(got, want, slack=1e-30)
    alone = torch.cat([ops.swiglu(x[i : i + 1]) for i in range(3)])
    assert torch.equal(got, alone)


def caches(rows: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (rows, 2, slots, 16)
    return torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)


def test_rope_cache_write_rotates_q_and_k_and_writes_the_given_slots() -> None:
    heads, groups, dim, slots = 4, 2, 16, 32
    table = rope_cache(slots, dim // 2, torch.bfloat16)  # ChatGLM2 rotates half of each head
    qkv = randn(3, (heads + 2 * groups) * dim, seed=5).bfloat16()
    positions, rows = torch.tensor([0, 7, 31]), torch.tensor([2, 0, 2])
    k_cache, v_cache = caches(3, slots)
    rotated = qkv.clone()
    ops.rope_cache_write(rotated, positions, rows, table, heads, k_cache, v_cache)
    heads_in = qkv[:, : (heads + groups) * dim].float().view(3, 1, heads + groups, dim)
    want = apply_rope(heads_in, table.float()[positions][:, None]).view(3, -1)
    assert within_one_rounding(rotated[:, : (heads + groups) * dim], want, slack=1e-5)
    assert torch.equal(rotated[:, (heads + groups) * dim :], qkv[:, (heads + groups) * dim :])  # v as is
    written = torch.zeros(3, slots, dtype=torch.bool)
    for i, (position, row) in enumerate(zip(positions.tolist(), rows.tolist(), strict=True)):
        keys = rotated[i, heads * dim : (heads + groups) * dim].view(groups, dim)
        values = rotated[i, (heads + groups) * dim :].view(groups, dim)
        assert torch.equal(k_cache[row, :, position], keys)
        assert torch.equal(v_cache[row, :, position], values)
        written[row, position] = True
    assert not k_cache[~written[:, None, :].expand(3, groups, slots)].any()
    assert not v_cache[~written[:, None, :].expand(3, groups, slots)].any()


def test_rope_cache_write_refuses_bad_positions_rows_and_shapes() -> None:
    table = rope_cache(8, 8, torch.bfloat16)
    k_cache, v_cache = caches(2, 8)
    qkv = torch.zeros(1, 8 * 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the 8 cache slots"):
        ops.rope_cache_write(qkv, torch.tensor([8]), torch.tensor([0]), table, 4, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="outside the 2 cache rows"):
        ops.rope_cache_write(qkv, torch.tensor([0]), torch.tensor([2]), table, 4, k_cache, v_cache)
    with pytest.raises(RuntimeError, match="features"):
        ops.rope_cache_write(qkv, torch.tensor([0]), torch.tensor([0]), table, 3, k_cache, v_cache)
    assert not k_cache.any() and not v_cache.any()


def tiny_model(dtype: torch.dtype) -> ChatGLM2:
    """TINY with random weights, its linears in the official int4 layout, prepared for ``dtype``."""
    model = ChatGLM2(TINY, dtype, quantized=True)
    for seed, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("layernorm.weight"):
            param.data = (1 + randn(*param.shape, seed=seed, scale=0.1)).to(dtype)
        else:
            param.data = randn(*param.shape, seed=seed, scale=0.5).to(dtype)
    for seed, layer in enumerate(m for m in model.modules() if isinstance(m, Int4Linear)):
        weight = randn(layer.out_features, layer.in_features, seed=100 + seed, scale=0.2)
        layer.weight, layer.weight_scale = quantize_int4(weight)
    prepare_int4(model, dtype, use_native=dtype == torch.bfloat16)
    model.eval().requires_grad_(False)
    return model


def decode_logits(model: ChatGLM2, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits after the prompt and after each of ``tokens`` fed one decode step at a time."""
    model.setup_caches(1, 64)
    with torch.inference_mode():
        out = [model(torch.tensor([prompt]), torch.arange(len(prompt)), last_only=True)[0, -1]]
        for position, token in enumerate(tokens, start=len(prompt)):
            out.append(model(torch.tensor([[token]]), torch.tensor([position]))[0, -1])
    return torch.stack(out)


def test_native_ops_model_is_as_close_to_float32_as_pytorchs_bfloat16_path() -> None:
    """Fed the float32 model's greedy tokens, the native ops' logits are no further from its logits
    than PyTorch's bfloat16 path's (measured RMS: 0.140 vs 0.158), and pick the same tokens."""
    prompt = [5, 17, 42, 99, 7, 250, 3]
    reference_model = tiny_model(torch.float32)
    greedy: list[int] = []
    for _ in range(6):
        greedy.append(int(decode_logits(reference_model, prompt, greedy)[-1].argmax()))
    reference = decode_logits(reference_model, prompt, greedy[:-1])
    model = tiny_model(torch.bfloat16)
    assert use_native_layers(model, pointwise=False) is False
    torch_path = decode_logits(model, prompt, greedy[:-1])
    assert use_native_layers(model) is True
    assert all(
        isinstance(block.input_layernorm, NativeRMSNorm) and isinstance(block.self_attention, NativeAttention)
        for block in model.blocks
    )
    fast = decode_logits(model, prompt, greedy[:-1])

    def rms(error: torch.Tensor) -> float:
        return float(error.pow(2).mean().sqrt())

    assert rms(fast - reference) <= 1.1 * rms(torch_path - reference)
    assert fast.argmax(dim=-1).tolist() == greedy


def test_native_ops_rows_decode_together_as_they_do_alone() -> None:
    model = tiny_model(torch.bfloat16)
    assert use_native_layers(model)
    model.setup_caches(2, 64)
    prompts = [[5, 17, 42, 99], [8, 9, 10, 11, 12, 13, 14]]
    alone = []
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            model(torch.tensor([prompt]), torch.arange(len(prompt)), first_row=row)
            alone.append(model(torch.tensor([[77]]), torch.tensor([len(prompt)]), first_row=row)[0, -1])
        positions = torch.tensor([[len(prompts[0])], [len(prompts[1])]])
        together = model(torch.tensor([[77], [77]]), positions)[:, -1]
    assert torch.equal(together, torch.stack(alone))


def test_native_ops_stay_off_for_float32() -> None:
    model = tiny_model(torch.float32)
    assert use_native_layers(model) is False
    assert not any(
        isinstance(block.mlp, NativeMLP) or isinstance(block.post_attention_layernorm, NativeRMSNorm)
        for block in model.blocks
    )


def batched_decode(model: ChatGLM2) -> torch.Tensor:
    """Two prompts prefilled into cache rows 1 and 2, then 4 decode steps of both rows together."""
    model.setup_caches(3, 64)
    prompts = [[5, 17, 42, 99], [8, 9, 10, 11, 12, 13, 14]]
    with torch.inference_mode():
        for row, prompt in enumerate(prompts, start=1):
            model(torch.tensor([prompt]), torch.arange(len(prompt)), first_row=row)
        tokens = torch.tensor([[77], [78]])
        positions = torch.tensor([[len(prompts[0])], [len(prompts[1])]])
        steps = []
        for _ in range(4):
            logits = model(tokens, positions, first_row=1)[:, -1]
            steps.append(logits)
            tokens, positions = logits.argmax(dim=-1, keepdim=True), positions + 1
    return torch.stack(steps)


def test_compiled_decode_step_gives_the_modules_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(torch.bfloat16)
    assert use_native_layers(model, fused_decode=False)
    modules = batched_decode(model)
    use_native_layers(model)
    runs: list[int] = []
    blocks_forward = type(model.blocks[0]).forward

    def counted(*args: object) -> torch.Tensor:
        runs.append(1)
        return blocks_forward(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(type(model.blocks[0]), "forward", counted)
    compiled = batched_decode(model)  # setup_caches inside: the step is rebuilt over the new caches
    assert torch.equal(compiled, modules)
    assert len(runs) == 2 * TINY.num_layers  # only the two prefills went through the modules


def test_a_layer_off_the_int4_kernel_keeps_the_modules() -> None:
    model = tiny_model(torch.bfloat16)
    assert use_native_layers(model)
    want = batched_decode(model)
    layer = model.blocks[1].mlp.dense_4h_to_h
    assert isinstance(layer, Int4Linear)
    layer.backend = DEQUANTIZED  # as if this linear were on PyTorch's kernels
    layer.weight, layer.weight_scale = quantize_int4(randn(TINY.hidden_size, TINY.ffn_hidden_size, seed=1))
    use_native_layers(model)
    got = batched_decode(model)
    assert model.fused_decoder is None
    assert got.shape == want.shape and not torch.equal(got, want)  # it ran, with the changed layer
