"""The bfloat16 CPU fast path: int4 layers on the native kernel and the two-term int4 output layer.

Tolerances (the float32 path stays the exact reference; these bound the fast path's rounding):
* one layer: the kernel rounds activations to int8 per block of 32 values (~0.5 % relative noise) and
  its output to bf16 (0.4 %): relative (Frobenius) error <= 1.5 %, any element <= 3 % of the output's
  largest magnitude.
* whole tiny model (2 layers, int4 fixture), teacher-forced over each fixture prompt's 8 greedy
  tokens: every logit within 10 % of the reference logits' standard deviation at that position
  (measured: <= 6.8 %, and 6.6 % with a bf16 output layer; a one-term int4 output layer gave ~40 %),
  and the same top-1 token wherever the reference top-1/top-2 margin is >= 0.5 (the measured
  largest logit error is ~0.26, so such a margin cannot flip).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bot.model.int4 import dequantize as dequantize_int4
from bot.model.int4 import quantize as quantize_int4
from bot.model.int4 import quantize_terms as quantize_int4_terms
from bot.model.kernels import build
from bot.model.loader import load_model
from bot.model.model import ChatGLM2
from bot.model.quant import Int4Linear
from tests.model.fixture import expected, require_native_kernel, tiny_dir

MARGIN = 0.5
LOGIT_TOLERANCE = 0.10  # of the reference logits' standard deviation


@pytest.fixture(scope="module")
def kernel() -> None:
    require_native_kernel()


def random_layer(out: int, in_features: int, bias: bool, seed: int, terms: int = 1) -> Int4Linear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, in_features, generator=gen).half()
    layer = Int4Linear(in_features, out, bias, torch.bfloat16, terms=terms)
    layer.weight, layer.weight_scale = quantize_int4_terms(weight, terms)
    if layer.bias is not None:
        layer.bias.data = torch.randn(out, generator=gen).bfloat16()
    return layer


def reference(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """float32 ``x @ W.T + bias`` from the layer's official tensors (before ``prepare`` drops them)."""
    rows = dequantize_int4(layer.weight, layer.weight_scale, torch.float32)
    weight = rows.view(layer.terms, layer.out_features, layer.in_features).sum(dim=0)
    out = x.float() @ weight.T
    return out + layer.bias.float() if layer.bias is not None else out


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(
    ("out", "in_features", "tokens", "terms"),
    [(64, 64, 1, 1), (96, 128, 3, 1), (40, 200, 17, 1), (640, 64, 2, 2), (48, 96, 5, 2)],
)
def test_native_layer_is_close_to_the_float32_reference(
    out: int, in_features: int, tokens: int, terms: int
) -> None:
    layer = random_layer(out, in_features, bias=terms == 1, seed=out + in_features, terms=terms)
    x = torch.randn(tokens, in_features).bfloat16()
    want = reference(layer, x)
    released: list[torch.Tensor] = []
    layer.prepare(torch.bfloat16, released.append, use_native=True)
    assert layer.backend.name == "native" and layer.weight.numel() == 0 and len(released) == 1
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, out)
    error = got.float() - want
    assert error.norm() <= 0.015 * want.norm()
    assert error.abs().max() <= 0.03 * want.abs().max()


def test_float32_stays_the_exact_reference_even_when_native_is_asked() -> None:
    layer = random_layer(64, 128, bias=True, seed=5)
    layer.bias = torch.nn.Parameter(torch.randn(64))
    x = torch.randn(3, 128)
    want = reference(layer, x)
    layer.prepare(torch.float32, use_native=True)
    assert layer.backend.name == "dequantize"
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_two_term_layer_without_kernel_is_the_exact_sum_of_its_terms() -> None:
    layer = random_layer(48, 96, bias=False, seed=2, terms=2)
    layer.bias = torch.nn.Parameter(torch.randn(48))
    x = torch.randn(4, 96)
    assert "terms=2" in repr(layer)
    torch.testing.assert_close(layer(x), reference(layer, x), atol=1e-5, rtol=1e-5)


def test_two_terms_cut_the_quantization_error_about_tenfold() -> None:
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)).half()
    packed, scale = quantize_int4_terms(weight, 2)
    first = quantize_int4(weight)
    assert torch.equal(packed[:256], first[0]) and torch.equal(scale[:256], first[1])
    rows = dequantize_int4(packed, scale, torch.float32)
    one_term = (rows[:256] - weight.float()).norm()
    two_terms = (rows[:256] + rows[256:] - weight.float()).norm()
    assert two_terms * 10 <= one_term


# -- the whole tiny model -----------------------------------------------------------------------------


def teacher_forced_logits(model: ChatGLM2, case: dict[str, Any]) -> torch.Tensor:
    """Logits at the positions predicting the case's 8 greedy tokens, feeding the reference ids."""
    prompt = next(
        p["input_ids"] for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == case["name"]
    )
    ids = prompt + case["greedy_8_no_eos_stop_ids"]
    model.setup_caches(1, len(ids))
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.tensor([ids]), torch.arange(len(ids)))[0]
    return logits[len(prompt) - 1 : len(ids) - 1]


@pytest.fixture(scope="module")
def float32_reference() -> ChatGLM2:
    return load_model(tiny_dir("int4"), dtype="float32", device="cpu")[0]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("int4_output_layer", [True, False])
def test_fast_path_greedy_tokens_and_logits_within_tolerance(
    float32_reference: ChatGLM2, int4_output_layer: bool
) -> None:
    fast, _, _ = load_model(
        tiny_dir("int4"), dtype="bfloat16", device="cpu", int4_output_layer=int4_output_layer
    )
    head = fast.transformer.output_layer
    assert isinstance(head, Int4Linear) == int4_output_layer
    checked = 0
    for case in expected()["int4"]:
        want = teacher_forced_logits(float32_reference, case)
        got = teacher_forced_logits(fast, case)
        spread = want.std(dim=-1, keepdim=True)
        assert ((got - want).abs() <= LOGIT_TOLERANCE * spread).all(), case["name"]
        top2 = want.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] >= MARGIN
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), case["name"]
        checked += int(clear.sum())
    assert checked >= 12  # most of the 24 greedy steps have a clear margin


@pytest.mark.usefixtures("no_kernel")
def test_without_the_kernel_auto_is_exactly_the_torch_path() -> None:
    auto, _, _ = load_model(tiny_dir("int4"), dtype="bfloat16", device="cpu")
    build.configure(enabled=True)
    torch_path, _, _ = load_model(tiny_dir("int4"), dtype="bfloat16", device="cpu", int4_kernel="torch")
    case = expected()["int4"][0]
    assert torch.equal(teacher_forced_logits(auto, case), teacher_forced_logits(torch_path, case))
    assert not isinstance(auto.transformer.output_layer, Int4Linear)
