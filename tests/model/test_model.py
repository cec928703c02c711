"""Forward-pass parity with the official ChatGLM2 code (tiny golden fixture), and the KV-cache design."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bot.model.config import ChatGLM2Config, ModelConfigError
from bot.model.kv_cache import read_kv, write_kv
from bot.model.loader import load_model
from bot.model.model import ChatGLM2, decode_attention, rope_cache
from tests.model.fixture import expected, tiny_dir
from tests.model.reference_ops import apply_rope

ATOL = 1e-4


def prompt(name: str) -> list[int]:
    return next(p["input_ids"] for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == name)


def cases(kind: str) -> list[dict[str, Any]]:
    return list(expected()[kind])


@pytest.fixture(scope="module", params=["fp32", "int4"])
def model(request: pytest.FixtureRequest) -> tuple[str, ChatGLM2]:
    m, _, _ = load_model(tiny_dir(request.param), dtype="float32", device="cpu")
    m.setup_caches(2, 256)
    return request.param, m


def full_logits(model: ChatGLM2, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.tensor([ids]), torch.arange(len(ids)))[0]
    return logits


def test_last_logits_match_official(model: tuple[str, ChatGLM2]) -> None:
    kind, m = model
    for case in cases(kind):
        logits = full_logits(m, prompt(case["name"]))[-1]
        want = torch.tensor(case["last_logits"]["full"])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
        assert int(logits.argmax()) == case["last_logits"]["argmax"]
        assert logits.topk(5).indices.tolist() == case["last_logits"]["top5_ids"]


def test_debug_values_per_layer() -> None:
    m, _, _ = load_model(tiny_dir("fp32"), dtype="float32", device="cpu")
    m.setup_caches(1, 256)
    debug = expected()["debug_fp32_zh_single"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.transformer.embedding.word_embeddings.register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("embedding", out)
        ),
        m.transformer.encoder.final_layernorm.register_forward_hook(
            lambda _m, _i, out: seen.__setitem__("final", out)
        ),
    ]
    for i, block in enumerate(m.blocks):
        hooks.append(block.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(f"layer{i}", out)))
    full_logits(m, prompt("zh_single"))
    for hook in hooks:
        hook.remove()

    def head(name: str) -> torch.Tensor:
        return seen[name][0, -1, :8]

    torch.testing.assert_close(head("embedding"), torch.tensor(debug["embedding_output"]), atol=1e-5, rtol=0)
    for i, values in enumerate(debug["layer_outputs"]):
        torch.testing.assert_close(head(f"layer{i}"), torch.tensor(values), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        head("final"), torch.tensor(debug["final_layernorm_output"]), atol=1e-4, rtol=0
    )


def test_rope_cache_matches_official() -> None:
    debug = expected()["debug_fp32_zh_single"]
    cache = rope_cache(256, 8, torch.float32)  # tiny model: head dim 16 -> 8 rotated dims
    assert list(cache.shape) == debug["rope_cache_shape"]
    torch.testing.assert_close(cache[1], torch.tensor(debug["rope_cache_pos1"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[5], torch.tensor(debug["rope_cache_pos5"]), atol=1e-6, rtol=0)


def test_rope_rotates_interleaved_pairs_of_first_half_only() -> None:
    x = torch.randn(1, 1, 1, 8)
    rope = rope_cache(4, 4, torch.float32)[3][None, None]  # position 3, 2 pairs
    out = apply_rope(x, rope)
    assert torch.equal(out[..., 4:], x[..., 4:])
    cos, sin = rope[0, 0, 0]
    torch.testing.assert_close(out[..., 0], x[..., 0] * cos - x[..., 1] * sin)
    torch.testing.assert_close(out[..., 1], x[..., 1] * cos + x[..., 0] * sin)


def test_incremental_decode_matches_full_forward(model: tuple[str, ChatGLM2]) -> None:
    _, m = model
    ids = prompt("en_single")
    want = full_logits(m, ids)
    with torch.inference_mode():
        m(torch.tensor([ids[:-3]]), torch.arange(len(ids) - 3))
        for pos in range(len(ids) - 3, len(ids)):
            got = m(torch.tensor([[ids[pos]]]), torch.tensor([pos]))[0, -1]
            torch.testing.assert_close(got, want[pos], atol=ATOL, rtol=0)


def test_batch_rows_at_different_positions_decode_together(model: tuple[str, ChatGLM2]) -> None:
    """The cache layout supports batched decoding of sequences of different lengths (per-row positions)."""
    _, m = model
    a, b = prompt("zh_single"), prompt("multi_turn")
    want_a, want_b = full_logits(m, a)[-1], full_logits(m, b)[-1]
    with torch.inference_mode():
        m(torch.tensor([a[:-1]]), torch.arange(len(a) - 1))  # row 0: prefill
        row1 = torch.tensor([b[:-1]])
        pos1 = torch.arange(len(b) - 1)[None]
        # fill row 1 of the cache by a batched call where row 0 re-writes its own slots
        both = torch.stack([torch.tensor(a[:-1] + [0] * (len(b) - len(a))), row1[0]])
        pos0 = torch.cat([torch.arange(len(a) - 1), torch.full((len(b) - len(a),), len(a) - 1)])
        m(both, torch.stack([pos0, pos1[0]]))
        out = m(torch.tensor([[a[-1]], [b[-1]]]), torch.tensor([[len(a) - 1], [len(b) - 1]]))
    torch.testing.assert_close(out[0, -1], want_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, -1], want_b, atol=ATOL, rtol=0)


def test_prefill_into_a_chosen_row_and_copy_kv_between_rows(model: tuple[str, ChatGLM2]) -> None:
    """``first_row`` prefills one request into its own row; ``read_kv``/``write_kv`` move a prefix."""
    _, m = model
    a = prompt("multi_turn")
    want = full_logits(m, a)[-1]  # row 0
    with torch.inference_mode():
        m(torch.tensor([a[:-1]]), torch.arange(len(a) - 1), first_row=1)
        out = m(torch.tensor([[a[-1]]]), torch.tensor([len(a) - 1]), first_row=1)
        torch.testing.assert_close(out[0, -1], want, atol=ATOL, rtol=0)
        kv = read_kv(m.caches(), 1, 10)
        assert kv.shape == (m.config.num_layers, 2, m.config.kv_groups, 10, m.config.head_dim)
        write_kv(m.caches(), 0, kv)  # row 0: the first 10 slots copied, the rest prefilled
        m(torch.tensor([a[10:-1]]), torch.arange(10, len(a) - 1), first_row=0)
        again = m(torch.tensor([[a[-1]]]), torch.tensor([len(a) - 1]))
    torch.testing.assert_close(again[0, -1], want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="exceed the caches"):
        m(torch.tensor([[1, 2]]), torch.arange(2), first_row=m.max_batch)


def test_decode_attention_matches_sdpa_with_per_row_masks() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=gen)
    k, v = torch.randn(3, 2, 12, 16, generator=gen), torch.randn(3, 2, 12, 16, generator=gen)
    positions = torch.tensor([[3], [11], [0]])
    mask = (torch.arange(12)[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, 1, T]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask), want, atol=1e-6, rtol=1e-5)
    half = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, atol=2e-2, rtol=0)


def test_bfloat16_compute_is_close_to_float32() -> None:
    m, _, _ = load_model(tiny_dir("int4"), dtype="bfloat16", device="cpu")
    m.setup_caches(1, 256)
    case = cases("int4")[1]
    logits = full_logits(m, prompt(case["name"]))[-1]
    # bf16 activations (8-bit mantissa) through 2 layers: logits of magnitude ~10 move by ~0.1
    torch.testing.assert_close(logits, torch.tensor(case["last_logits"]["full"]), atol=0.5, rtol=0)
    assert int(logits.argmax()) == case["last_logits"]["argmax"]


def test_forward_beyond_cache_is_a_clear_error(model: tuple[str, ChatGLM2]) -> None:
    _, m = model
    with pytest.raises(ValueError, match="exceed the caches"):
        m(torch.tensor([[1]]), torch.tensor([256]))


def test_config_presets_and_fixture() -> None:
    six_b = ChatGLM2Config.from_name("chatglm2-6b")
    assert (six_b.num_layers, six_b.hidden_size, six_b.padded_vocab_size) == (28, 4096, 65024)
    assert (six_b.q_size, six_b.kv_size, six_b.rotary_dim, six_b.kv_groups) == (4096, 256, 64, 2)
    assert ChatGLM2Config.from_name("chatglm2-6b-int4").quantization_bit == 4
    tiny = ChatGLM2Config.from_json(tiny_dir("int4") / "config.json")
    assert (tiny.num_layers, tiny.hidden_size, tiny.quantization_bit, tiny.seq_length) == (2, 64, 4, 256)
    with pytest.raises(ModelConfigError, match="unknown preset"):
        ChatGLM2Config.from_name("chatglm3")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_attention_heads": 3}, "multiple"),
        ({"quantization_bit": 8}, "quantization_bit"),
        ({"add_bias_linear": True}, "unsupported"),
        ({"rope_ratio": 16}, "rope_ratio"),
        ({"layernorm_epsilon": -1.0}, "layernorm_epsilon"),
    ],
)
def test_config_rejects_what_the_engine_does_not_implement(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        ChatGLM2Config.from_dict(raw)


def test_config_ignores_unknown_fields_and_null_quantization() -> None:
    config = ChatGLM2Config.from_dict({"auto_map": {}, "quantization_bit": None, "layernorm_epsilon": 1})
    assert config.quantization_bit == 0 and config.layernorm_epsilon == 1.0
