"""bench/peers.py writes the files llama.cpp and chatglm.cpp load: names, shapes, types, layout."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from bench import peers
from tests.model.fixture import tiny_dir


def tiny_shapes() -> tuple[dict[str, Any], int, int, int, int]:
    """The tiny checkpoint's config and its hidden, ffn, vocabulary and qkv widths."""
    config = json.loads((tiny_dir("int4") / "config.json").read_text())
    hidden, ffn, vocab = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    qkv = hidden + 2 * config["multi_query_group_num"] * hidden // config["num_attention_heads"]
    return config, hidden, ffn, vocab, qkv


def test_gguf_of_the_checkpoint_shapes(tmp_path: Path) -> None:
    path = peers.make_gguf(tiny_dir("int4"), tmp_path / "tiny.gguf")
    assert path.exists() and not path.with_suffix(".partial").exists()
    config, hidden, ffn, vocab, qkv = tiny_shapes()
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "chatglm"
    block_count = reader.fields["chatglm.block_count"]
    assert int(block_count.parts[block_count.data[0]][0]) == config["num_layers"]
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == vocab
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 7 * config["num_layers"]
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    expected = {  # ggml order: [columns, rows]
        "token_embd.weight": ([hidden, vocab], q4_0),
        "blk.0.attn_qkv.weight": ([hidden, qkv], q4_0),
        "blk.0.attn_qkv.bias": ([qkv], gguf.GGMLQuantizationType.F32),
        "blk.1.ffn_up.weight": ([hidden, 2 * ffn], q4_0),
        "blk.1.ffn_down.weight": ([ffn, hidden], q4_0),
        "output.weight": ([hidden, vocab], q4_0),
    }
    for name, (shape, kind) in expected.items():
        assert list(tensors[name].shape) == shape and tensors[name].tensor_type == kind, name
    blocks = np.asarray(tensors["blk.0.attn_output.weight"].data).reshape(-1, peers.Q4_0_BYTES)
    scales = blocks[:, :2].copy().view(np.float16)
    assert np.all(scales == np.float16(0.005)) and blocks[:, 2:].std() > 50  # random nibbles
    assert peers.make_gguf(tiny_dir("int4"), path) == path  # kept and reused


def read_chatglm_ggml(
    path: Path,
) -> tuple[int, tuple[object, ...], bytes, dict[str, tuple[list[int], int, bytes]]]:
    """chatglm.cpp 0.4.2's loader (``Pipeline::Pipeline`` and ``ModelLoader::read_state_dict``) in
    Python: model type, config record, tokenizer proto, then tensors at 16-byte-aligned offsets."""
    data = path.read_bytes()
    assert data[:4] == b"ggml"
    model_type = struct.unpack_from("<i", data, 4)[0]
    record = struct.unpack_from(peers.CHATGLM_CONFIG, data, 8)
    pos = 8 + struct.calcsize(peers.CHATGLM_CONFIG)
    (proto_size,) = struct.unpack_from("<i", data, pos)
    proto = data[pos + 4 : pos + 4 + proto_size]
    pos += 4 + proto_size
    tensors = {}
    while pos < len(data):
        (name_size,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4 : pos + 4 + name_size].decode()
        pos += 4 + name_size
        (ndim,) = struct.unpack_from("<i", data, pos)
        shape = list(struct.unpack_from(f"<{ndim}i", data, pos + 4))
        (kind,) = struct.unpack_from("<i", data, pos + 4 + 4 * ndim)
        pos = (pos + 8 + 4 * ndim + 15) // 16 * 16
        values = int(np.prod(shape))
        size = values // 32 * 18 if kind == peers.GGML_Q4_0 else values * 4
        tensors[name] = (shape, kind, data[pos : pos + size])
        pos += size
    assert pos == len(data)  # the loader stops exactly at the end
    return model_type, record, proto, tensors


def test_chatglm_ggml_of_the_checkpoint_shapes(tmp_path: Path) -> None:
    path = peers.make_chatglm_ggml(tiny_dir("int4"), tmp_path / "tiny.chatglm.bin")
    assert path.exists() and not path.with_suffix(".partial").exists()
    config, hidden, ffn, vocab, qkv = tiny_shapes()
    model_type, record, proto, tensors = read_chatglm_ggml(path)
    assert model_type == 2  # ModelType::CHATGLM2
    assert record[:8] == (2, peers.GGML_Q4_0, vocab, hidden, 4, 2, config["num_layers"], ffn)
    assert record[8] == pytest.approx(1e-5) and record[9:] == (0, 10000.0, 256, 2, 0)
    assert proto == (tiny_dir("int4") / "tokenizer.model").read_bytes()
    assert len(tensors) == 3 + 7 * config["num_layers"]
    expected = {  # torch order, as the converter writes shapes
        "transformer.embedding.word_embeddings.weight": ([vocab, hidden], peers.GGML_Q4_0),
        "transformer.encoder.layers.0.self_attention.query_key_value.weight": (
            [qkv, hidden],
            peers.GGML_Q4_0,
        ),
        "transformer.encoder.layers.0.self_attention.query_key_value.bias": ([qkv], peers.GGML_F32),
        "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight": ([2 * ffn, hidden], peers.GGML_Q4_0),
        "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight": ([hidden, ffn], peers.GGML_Q4_0),
        "transformer.encoder.final_layernorm.weight": ([hidden], peers.GGML_F32),
        "transformer.output_layer.weight": ([vocab, hidden], peers.GGML_Q4_0),
    }
    for name, (shape, kind) in expected.items():
        assert tensors[name][:2] == (shape, kind), name
    blocks = np.frombuffer(tensors["transformer.encoder.layers.0.self_attention.dense.weight"][2], np.uint8)
    blocks = blocks.reshape(-1, peers.Q4_0_BYTES)
    assert np.all(blocks[:, :2].copy().view(np.float16) == peers.Q4_0_SCALE) and blocks[:, 2:].std() > 50
    norm = np.frombuffer(tensors["transformer.encoder.layers.0.input_layernorm.weight"][2], np.float32)
    assert np.all(norm == 1.0)
    assert peers.make_chatglm_ggml(tiny_dir("int4"), path) == path  # kept and reused


def test_chatglm_cpp_runs_the_file(tmp_path: Path) -> None:
    """Where chatglm-cpp is built (it is not part of the dev install), its runtime loads the file and
    the bench measures it."""
    pytest.importorskip("chatglm_cpp")
    path = peers.make_chatglm_ggml(tiny_dir("int4"), tmp_path / "tiny.chatglm.bin")
    report = peers.run_chatglm_cpp(path, list(range(3, 25)), new_tokens=4, repeats=1)  # ids < vocab
    assert report["prefill_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0


def test_llama_cpp_runs_the_gguf(tmp_path: Path) -> None:
    """Where llama-cpp-python is built (not part of the dev install), it loads the GGUF and the bench
    measures it."""
    pytest.importorskip("llama_cpp")
    path = peers.make_gguf(tiny_dir("int4"), tmp_path / "tiny.gguf")
    report = peers.run_llama_cpp(path, list(range(3, 25)), new_tokens=4, threads=1, repeats=1)
    assert report["prefill_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0
