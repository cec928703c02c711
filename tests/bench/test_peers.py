"""bench/peers.py writes a GGUF that llama.cpp's ``chatglm`` architecture loads: names, shapes, types."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from bench import peers
from tests.model.fixture import tiny_dir


def test_gguf_of_the_checkpoint_shapes(tmp_path: Path) -> None:
    path = peers.make_gguf(tiny_dir("int4"), tmp_path / "tiny.gguf")
    assert path.exists() and not path.with_suffix(".partial").exists()
    config = json.loads((tiny_dir("int4") / "config.json").read_text())
    hidden, ffn, vocab = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    qkv = hidden + 2 * config["multi_query_group_num"] * hidden // config["num_attention_heads"]
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
