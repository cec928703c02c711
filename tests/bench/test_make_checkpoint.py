"""bench/make_checkpoint.py at the tiny fixture sizes: the layout must match the official one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.make_checkpoint import (
    FP16_SHARDS,
    OFFICIAL_CONFIG,
    TINY_SIZES,
    build_checkpoint,
    official_config,
    tensor_specs,
)
from bot.model import int4
from tests.model.fixture import expected, tiny_dir


def _layout(state: dict[str, torch.Tensor]) -> dict[str, dict[str, object]]:
    return {
        k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in state.items()
    }


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """The fixture's dequant formula without the scale: arithmetic high nibble, sign-extended low."""
    p = packed.to(torch.int16)
    hi = p >> 4
    lo = ((p & 0xF) ^ 8) - 8
    return torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1)


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "int4", kind="int4", sizes=TINY_SIZES)


def test_int4_layout_matches_official(int4_dir: Path) -> None:
    state = torch.load(int4_dir / "pytorch_model.bin", weights_only=True)
    expected_layout = expected()["state_dict_int4"]
    assert _layout(state) == expected_layout
    assert list(state) == list(expected_layout)  # same order as the official state_dict
    config = json.loads((int4_dir / "config.json").read_text())
    fixture_config = json.loads((tiny_dir("int4") / "config.json").read_text())
    assert config["quantization_bit"] == 4
    assert {**config, "_name_or_path": None} == {**fixture_config, "_name_or_path": None}
    tok_config = json.loads((int4_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "ChatGLMTokenizer"
    # Tiny vocabulary (640 ids): the tiny tokenizer is copied, not the 64794-id real one.
    assert (int4_dir / "tokenizer.model").read_bytes() == (tiny_dir("int4") / "tokenizer.model").read_bytes()


def test_int4_values_have_realistic_scales(int4_dir: Path) -> None:
    state = torch.load(int4_dir / "pytorch_model.bin", weights_only=True)
    name = "transformer.encoder.layers.1.mlp.dense_h_to_4h"
    q = _unpack(state[f"{name}.weight"])
    assert q.min() >= -7 and q.max() <= 7
    weight = q.float() * state[f"{name}.weight_scale"].float()[:, None]
    assert 0.015 < weight.std().item() < 0.025
    norm = state["transformer.encoder.layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1) < 0.05
    emb = state["transformer.embedding.word_embeddings.weight"].float()
    assert 0.015 < emb.std().item() < 0.025
    official = torch.load(tiny_dir("int4") / "pytorch_model.bin", weights_only=True)
    name = "transformer.rotary_pos_emb.inv_freq"
    assert torch.equal(state[name], official[name])  # RoPE frequencies are exact, not random


def test_pack_int4_reproduces_fixture_checkpoint() -> None:
    """Quantising the fixture's fp32 weights as the official code does and packing them with
    int4.pack gives the fixture's int4 tensors bit for bit."""
    fp32 = torch.load(tiny_dir("fp32") / "pytorch_model.bin", weights_only=True)
    official = torch.load(tiny_dir("int4") / "pytorch_model.bin", weights_only=True)
    name = "transformer.encoder.layers.0.self_attention.query_key_value"
    w16 = fp32[f"{name}.weight"].half()
    scale = w16.abs().max(dim=-1).values / 7
    q = torch.round(w16 / scale[:, None]).to(torch.int8)
    assert torch.equal(scale, official[f"{name}.weight_scale"])
    assert torch.equal(int4.pack(q), official[f"{name}.weight"])
    assert torch.equal(_unpack(int4.pack(q)), q.to(torch.int16))


def test_fp16_shards_and_index(tmp_path: Path) -> None:
    out = build_checkpoint(tmp_path / "fp16", kind="fp16", sizes=TINY_SIZES)
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert shard_names == [f"pytorch_model-{n:05d}-of-00007.bin" for n in range(1, FP16_SHARDS + 1)]
    state: dict[str, torch.Tensor] = {}
    for shard in shard_names:
        part = torch.load(out / shard, weights_only=True)
        assert all(index["weight_map"][k] == shard for k in part)
        state.update(part)
    fp32_layout = expected()["state_dict_fp32"]
    assert _layout(state) == {k: {**v, "dtype": "float16"} for k, v in fp32_layout.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_bit" not in config
    assert config["torch_dtype"] == "float16"


def test_built_once_then_reused(tmp_path: Path) -> None:
    target = tmp_path / "ck"
    first = build_checkpoint(target, kind="int4", sizes=TINY_SIZES, seed=1)
    weights = first / "pytorch_model.bin"
    stamp = weights.stat().st_mtime_ns
    assert build_checkpoint(target, kind="int4", sizes=TINY_SIZES, seed=1) == first
    assert weights.stat().st_mtime_ns == stamp
    before = weights.read_bytes()
    build_checkpoint(target, kind="int4", sizes=TINY_SIZES, seed=2)  # different build: redone
    assert weights.read_bytes() != before
    assert not (tmp_path / "ck.partial").exists()


def test_refuses_foreign_folder_and_bad_kind(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_checkpoint(tmp_path, kind="int4", sizes=TINY_SIZES)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="kind"):
        build_checkpoint(tmp_path / "x", kind="int8", sizes=TINY_SIZES)  # type: ignore[arg-type]


def test_full_size_layout_is_chatglm2_6b() -> None:
    """Full-size shapes without writing anything: 6.2B parameters, ~3.9 GB of int4 weights."""
    config = official_config("int4")
    assert {k: config[k] for k in TINY_SIZES} == {k: OFFICIAL_CONFIG[k] for k in TINY_SIZES}
    specs = {s.name: s for s in tensor_specs(config, "int4")}
    assert specs["transformer.encoder.layers.27.self_attention.query_key_value.weight"].shape == (4608, 2048)
    assert specs["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape == (27392, 2048)
    assert specs["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight_scale"].shape == (4096,)
    assert specs["transformer.output_layer.weight"].shape == (65024, 4096)
    assert specs["transformer.rotary_pos_emb.inv_freq"].shape == (32,)
    assert 3.8e9 < sum(s.nbytes for s in specs.values()) < 4.0e9
    fp16 = tensor_specs(official_config("fp16"), "fp16")
    assert 6.1e9 < sum(s.nbytes for s in fp16) / 2 < 6.3e9
