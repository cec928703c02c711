"""bot/model/int4.py: the official int4 format round-trips and reproduces the official checkpoint."""

from __future__ import annotations

import pytest
import torch

from bot.model import int4
from tests.model.fixture import tiny_dir

QUANTIZED = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def test_pack_unpack_round_trip_and_nibble_order() -> None:
    q = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    packed = int4.pack(q)
    assert packed.dtype == torch.int8 and packed.shape == (5, 6)
    assert torch.equal(int4.unpack(packed), q)
    one = int4.pack(torch.tensor([[-3, 5]], dtype=torch.int8))
    assert int(one[0, 0]) == int(torch.tensor(((-3 << 4) | 5) & 0xFF, dtype=torch.uint8).view(torch.int8))


def test_pack_takes_integral_floats_and_wide_ints_alike() -> None:
    q = torch.randint(-8, 8, (7, 10), dtype=torch.int8)
    for dtype in (torch.float32, torch.int16, torch.int64):
        assert torch.equal(int4.pack(q.to(dtype)), int4.pack(q))


def test_pack_matches_the_official_formula_on_every_nibble_pair() -> None:
    """packed[i, j] = ((q[i, 2j] << 4) | (q[i, 2j+1] & 0xF)) as int8, for all 256 pairs."""
    pairs = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8))  # [256, 2]
    want = [((int(h) << 4) | (int(low) & 0xF)) & 0xFF for h, low in pairs]
    got = int4.pack(pairs).view(torch.uint8).flatten().tolist()
    assert got == want


def test_quantize_then_dequantize_is_within_half_a_step() -> None:
    weight = torch.randn(40, 256, generator=torch.Generator().manual_seed(1)).half()
    packed, scale = int4.quantize(weight)
    back = int4.dequantize(packed, scale, torch.float32)
    assert torch.equal(int4.quantize(back)[0], packed)  # dequantized weights quantize to themselves
    assert ((back - weight.float()).abs() <= scale.float()[:, None] / 2 + 1e-3).all()
    exact = int4.unpack(packed).float() * scale.float()[:, None]
    assert torch.equal(back, exact)  # q * scale is exact in float32


def test_quantize_reproduces_the_official_int4_checkpoint() -> None:
    fp32 = torch.load(tiny_dir("fp32") / "pytorch_model.bin", weights_only=True)
    official = torch.load(tiny_dir("int4") / "pytorch_model.bin", weights_only=True)
    checked = 0
    for key, weight in fp32.items():
        if key.endswith(".weight") and key.split(".")[-2] in QUANTIZED:
            packed, scale = int4.quantize(weight)
            assert torch.equal(packed, official[key]), key
            assert torch.equal(scale, official[key + "_scale"]), key
            checked += 1
    assert checked == 8


def test_quantizing_in_row_chunks_equals_the_whole_matrix_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(37, 16, generator=torch.Generator().manual_seed(4)).half()
    whole = int4.quantize(weight)
    monkeypatch.setattr(int4, "CHUNK_ROWS", 8)  # 37 rows: four full chunks and a partial one
    chunked = int4.quantize(weight)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


def test_all_zero_row_quantizes_to_zero() -> None:
    weight = torch.randn(3, 8).half()
    weight[1] = 0
    packed, scale = int4.quantize(weight)
    assert float(scale[1]) == 0 and not bool(int4.unpack(packed)[1].any())


def test_terms_add_up_to_a_closer_weight() -> None:
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    packed, scale = int4.quantize_terms(weight, 2)
    assert packed.shape == (48, 32) and scale.shape == (48,)
    first = int4.quantize(weight)
    assert torch.equal(packed[:24], first[0]) and torch.equal(scale[:24], first[1])
    rows = int4.dequantize(packed, scale, torch.float32)
    one = (rows[:24] - weight).abs().max()
    two = (rows[:24] + rows[24:] - weight).abs().max()
    assert two < one / 4


def test_odd_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        int4.quantize(torch.zeros(2, 3))
