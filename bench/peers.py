"""Peer engines on ChatGLM2-6B's shapes, for same-run ratios in bench/decode.py.

llama.cpp (through ``llama-cpp-python``) runs ChatGLM2 as its ``chatglm`` architecture from a GGUF
file. Its converter needs the official remote code, so ``make_gguf`` writes the GGUF itself: the
shapes and hyperparameters of the checkpoint's config.json, the vocabulary of its tokenizer.model and
random q4_0 weights (llama.cpp's own format; it repacks q4_0 for its AVX2 / AVX512 kernels at load),
which cost exactly what real ones cost.

chatglm.cpp (through ``chatglm-cpp``, which PyPI ships only as source:
``CMAKE_POLICY_VERSION_MINIMUM=3.5 pip install chatglm-cpp`` builds it; its bundled libraries predate
CMake 4) loads its own GGML file. Its converter needs the official remote code as well, so
``make_chatglm_ggml`` writes that file the way the converter does (``chatglm_cpp/convert.py`` of
0.4.2: magic, model type, a version-2 config record, the tokenizer's sentencepiece proto, then each
tensor's name, shape, type and 16-byte-aligned data), again with random q4_0 weights.

    python -m bench.peers [--model DIR] [--threads 2] [--prompt-tokens 512] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as python bench/<name>.py: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

Q4_0_BLOCK, Q4_0_BYTES = 32, 18  # values per block; fp16 scale + 16 bytes of nibbles
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
Q4_0_SCALE = np.float16(0.02 / 4)  # random nibbles in -8..7 give |w| up to ~0.04
# chatglm.cpp's file: ggml_type ids, ModelType.CHATGLM2, ModelConfigRecordV2 after its version
GGML_F32, GGML_Q4_0, CHATGLM2_MODEL_TYPE, CHATGLM_CONFIG = 0, 2, 2, "<iiiiiiiififiii"


def available() -> dict[str, bool]:
    return {
        "llama-cpp-python": bool(importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf")),
        "chatglm-cpp": bool(importlib.util.find_spec("chatglm_cpp")),
    }


def make_gguf(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A q4_0 GGUF of the checkpoint's shapes with random weights; kept and reused when present."""
    if out.exists():
        return out
    import gguf  # only where the peer is installed
    import sentencepiece

    config = json.loads((model_dir / "config.json").read_text())
    hidden, ffn, layers = config["hidden_size"], config["ffn_hidden_size"], config["num_layers"]
    heads, groups = config["num_attention_heads"], config["multi_query_group_num"]
    head_dim = hidden // heads
    vocab = config["padded_vocab_size"]
    qkv = hidden + 2 * groups * head_dim

    writer = gguf.GGUFWriter(str(out.with_suffix(".partial")), "chatglm")
    writer.add_context_length(config["seq_length"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(groups)
    writer.add_layer_norm_rms_eps(config.get("layernorm_epsilon", 1e-5))
    writer.add_rope_dimension_count(head_dim // 2)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_add_bos_token(False)
    _add_vocab(
        writer, sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")), vocab
    )

    # numpy shapes are [rows, columns]; the writer stores them in ggml's reversed order
    tensors: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (vocab, hidden), True)]
    for i in range(layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (hidden,), False),
            (f"blk.{i}.attn_qkv.weight", (qkv, hidden), True),
            (f"blk.{i}.attn_qkv.bias", (qkv,), False),
            (f"blk.{i}.attn_output.weight", (hidden, hidden), True),
            (f"blk.{i}.ffn_norm.weight", (hidden,), False),
            (f"blk.{i}.ffn_up.weight", (2 * ffn, hidden), True),
            (f"blk.{i}.ffn_down.weight", (hidden, ffn), True),
        ]
    tensors += [("output_norm.weight", (hidden,), False), ("output.weight", (vocab, hidden), True)]
    for name, shape, quantized in tensors:
        if quantized:
            byte_shape = (shape[0], shape[1] // Q4_0_BLOCK * Q4_0_BYTES)
            writer.add_tensor_info(
                name,
                byte_shape,
                np.dtype(np.uint8),
                int(np.prod(byte_shape)),
                raw_dtype=gguf.GGMLQuantizationType.Q4_0,
            )
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, quantized in tensors:
        writer.write_tensor_data(_random_tensor(rng, name, shape, quantized))
    writer.close()
    out.with_suffix(".partial").rename(out)
    return out


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], q4_0: bool) -> np.ndarray:
    """Random q4_0 blocks ([rows, blocks * 18] bytes, one fp16 scale each), ones for a norm, else
    small float32 values (biases)."""
    if q4_0:
        blocks = rng.integers(0, 256, (shape[0], shape[1] // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
        blocks[..., :2] = np.frombuffer(Q4_0_SCALE.tobytes(), dtype=np.uint8)
        return blocks.reshape(shape[0], -1)
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    return rng.normal(0, 0.02, shape).astype(np.float32)


def chatglm_ggml_tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, [rows, columns], q4_0?) in the order chatglm.cpp's ChatGLM2 converter writes them."""
    hidden, ffn, vocab = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    qkv = hidden + 2 * config["multi_query_group_num"] * hidden // config["num_attention_heads"]
    tensors: list[tuple[str, tuple[int, ...], bool]] = [
        ("transformer.embedding.word_embeddings.weight", (vocab, hidden), True)
    ]
    for i in range(config["num_layers"]):
        layer = f"transformer.encoder.layers.{i}."
        tensors += [
            (layer + "input_layernorm.weight", (hidden,), False),
            (layer + "self_attention.query_key_value.weight", (qkv, hidden), True),
            (layer + "self_attention.query_key_value.bias", (qkv,), False),
            (layer + "self_attention.dense.weight", (hidden, hidden), True),
            (layer + "post_attention_layernorm.weight", (hidden,), False),
            (layer + "mlp.dense_h_to_4h.weight", (2 * ffn, hidden), True),
            (layer + "mlp.dense_4h_to_h.weight", (hidden, ffn), True),
        ]
    tensors += [
        ("transformer.encoder.final_layernorm.weight", (hidden,), False),
        ("transformer.output_layer.weight", (vocab, hidden), True),
    ]
    return tensors


def make_chatglm_ggml(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A chatglm.cpp GGML file (q4_0, random weights) of the checkpoint's shapes; kept and reused."""
    if out.exists():
        return out
    config = json.loads((model_dir / "config.json").read_text())
    record = (
        2,  # config record version
        GGML_Q4_0,
        config["padded_vocab_size"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["multi_query_group_num"],
        config["num_layers"],
        config["ffn_hidden_size"],
        config.get("layernorm_epsilon", 1e-5),
        0,  # prefix-tuning virtual tokens
        10000.0 * config.get("rope_ratio", 1),
        config["seq_length"],
        config.get("eos_token_id", 2),
        config.get("pad_token_id", 0),
    )
    proto = (model_dir / "tokenizer.model").read_bytes()  # the sentencepiece ModelProto itself
    rng = np.random.default_rng(seed)
    partial = out.with_suffix(".partial")
    with partial.open("wb") as f:
        f.write(b"ggml" + struct.pack("<i", CHATGLM2_MODEL_TYPE) + struct.pack(CHATGLM_CONFIG, *record))
        f.write(struct.pack("<i", len(proto)) + proto)
        for name, shape, quantized in chatglm_ggml_tensors(config):
            encoded = name.encode()
            f.write(struct.pack("<i", len(encoded)) + encoded)
            f.write(
                struct.pack(f"<{len(shape) + 2}i", len(shape), *shape, GGML_Q4_0 if quantized else GGML_F32)
            )
            f.seek((f.tell() + 15) // 16 * 16)  # the loader reads each tensor at a 16-byte boundary
            f.write(_random_tensor(rng, name, shape, quantized).tobytes())
    partial.rename(out)
    return out


def _add_vocab(writer: Any, sp: Any, vocab: int) -> None:
    import gguf

    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(kind)
    for i in range(len(tokens), vocab):
        special = i - sp.get_piece_size()
        named = special < len(SPECIAL_TOKENS)
        tokens.append((SPECIAL_TOKENS[special] if named else f"[PAD{i}]").encode())
        scores.append(0.0)
        types.append(gguf.TokenType.CONTROL if named else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_eos_token_id(sp.eos_id())


def _summary(load_s: float, prefill: list[float], decode: list[float]) -> dict[str, float]:
    """A peer's load time and best and median tokens/s over the repeats."""
    return {
        "load_s": round(load_s, 2),
        "prefill_tokens_per_s": round(max(prefill), 2),
        "prefill_tokens_per_s_median": round(float(np.median(prefill)), 2),
        "decode_tokens_per_s": round(max(decode), 2),
        "decode_tokens_per_s_median": round(float(np.median(decode)), 2),
    }


def run_llama_cpp(
    gguf_path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int
) -> dict[str, float]:
    """Best and median prefill and decode tokens/s of llama.cpp on ``prompt`` (ids fed directly; each
    step computes the logits of its last token, as ours do)."""
    from llama_cpp import Llama

    started = time.perf_counter()
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=len(prompt) + new_tokens + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill.append(len(prompt) / (time.perf_counter() - started))
        started = time.perf_counter()
        for step in range(new_tokens):  # the ids fed do not change the cost; no sampling is timed
            llm.eval([prompt[step % len(prompt)]])
        decode.append(new_tokens / (time.perf_counter() - started))
    llm.close()
    return _summary(load_s, prefill, decode)


def run_chatglm_cpp(ggml_path: Path, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    """Best and median prefill and decode tokens/s of chatglm.cpp on ``prompt``, greedy, through the
    model's ``generate_next_token`` (what its own ``generate`` loop calls per token). chatglm.cpp
    picks its thread count itself (the cores, up to 4, on a machine with <= 4)."""
    import chatglm_cpp

    started = time.perf_counter()
    pipeline = chatglm_cpp.Pipeline(str(ggml_path), max_length=len(prompt) + new_tokens + 8)
    load_s = time.perf_counter() - started
    greedy = chatglm_cpp._C.GenerationConfig(max_length=len(prompt) + new_tokens + 8, do_sample=False)
    prefill, decode = [], []
    for _ in range(repeats):
        ids = list(prompt)
        started = time.perf_counter()
        ids.append(pipeline.model.generate_next_token(ids, None, greedy, 0, len(prompt)))
        prefill.append(len(prompt) / (time.perf_counter() - started))
        started = time.perf_counter()
        for _ in range(new_tokens):
            ids.append(pipeline.model.generate_next_token(ids, None, greedy, len(ids) - 1, len(prompt)))
        decode.append(new_tokens / (time.perf_counter() - started))
    del pipeline
    return _summary(load_s, prefill, decode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=common.DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's (chatglm.cpp picks its own)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    installed = available()
    if not any(installed.values()):
        parser.error("neither llama-cpp-python (with gguf) nor chatglm-cpp is installed")
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, 60000, args.prompt_tokens)]
    report: dict[str, Any] = {}
    if installed["llama-cpp-python"]:
        path = make_gguf(args.model, args.model.parent / f"{args.model.name}-q4_0.gguf")
        report["llama-cpp-python"] = run_llama_cpp(path, prompt, args.new_tokens, args.threads, args.repeats)
    if installed["chatglm-cpp"]:
        path = make_chatglm_ggml(args.model, args.model.parent / f"{args.model.name}-q4_0.chatglm.bin")
        report["chatglm-cpp"] = run_chatglm_cpp(path, prompt, args.new_tokens, args.repeats)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
