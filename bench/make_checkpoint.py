"""Build a ChatGLM2-6B(-int4) checkpoint folder with random weights, for benchmarks.

The folder has the official layout (config.json, tokenizer files, pytorch_model*.bin with the
official tensor names, dtypes and shapes), so the real loader and model run on it at full size
without downloading the 6B weights. Values are random with realistic scales: linear weights
~N(0, 0.02) (int4: per-row fp16 scales chosen so the dequantised weights have that spread),
RMSNorm weights ~1, the exact RoPE inv_freq.

    python -m bench.make_checkpoint [--kind int4|fp16] [--out DIR] [--tiny]

prints the folder. Built once: a folder holding a matching ``.complete`` marker is reused.
Tensors are generated into memory-mapped scratch files one at a time, so memory stays low while
the ~3.9 GB int4 file (or 12.5 GB of fp16 shards) is written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

if __package__ in (None, ""):  # run as python bench/<name>.py: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common
from bot.model import int4

Kind = Literal["int4", "fp16"]

REAL_TOKENIZER = (
    common.REPO_ROOT.parent / "shared" / "fixtures" / "chatglm2" / "real-tokenizer" / "tokenizer.model"
)
TINY_TOKENIZER = common.FIXTURE_DIR / "chatglm2-tiny-int4" / "tokenizer.model"
REAL_VOCAB = 64794  # SentencePiece pieces + 5 GLM special tokens of the real tokenizer
MARKER = ".complete"
FP16_SHARDS = 7
CHUNK_ELEMENTS = 1 << 24  # random values generated per step

# config.json of THUDM/chatglm2-6b; the int4 release adds quantization_bit=4.
OFFICIAL_CONFIG: dict[str, Any] = {
    "_name_or_path": "THUDM/chatglm2-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.30.2",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# The sizes of the tiny golden fixture (tests/fixtures/chatglm2), for fast tests.
TINY_SIZES: dict[str, int] = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 128,
    "padded_vocab_size": 640,
    "seq_length": 256,
}

Init = Literal["normal", "norm", "bias", "int4", "scale", "inv_freq"]
QUANTIZED = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: Init

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def official_config(kind: Kind, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    config = {**OFFICIAL_CONFIG, **(sizes or {})}
    if kind == "int4":
        config["_name_or_path"] = "THUDM/chatglm2-6b-int4"
        config["quantization_bit"] = 4
    return config


def tensor_specs(config: Mapping[str, Any], kind: Kind) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in the official state_dict order."""
    hidden, vocab = config["hidden_size"], config["padded_vocab_size"]
    kv = config["kv_channels"]
    qkv_out = config["num_attention_heads"] * kv + 2 * config["multi_query_group_num"] * kv
    ffn = config["ffn_hidden_size"]
    f16 = torch.float16
    linears = {  # name -> (out, in)
        "self_attention.query_key_value": (qkv_out, hidden),
        "self_attention.dense": (hidden, hidden),
        "mlp.dense_h_to_4h": (2 * ffn, hidden),
        "mlp.dense_4h_to_h": (hidden, ffn),
    }

    def linear(prefix: str, name: str) -> list[TensorSpec]:
        out, inp = linears[name]
        if kind == "fp16":
            return [TensorSpec(f"{prefix}.{name}.weight", (out, inp), f16, "normal")]
        return [
            TensorSpec(f"{prefix}.{name}.weight", (out, inp // 2), torch.int8, "int4"),
            TensorSpec(f"{prefix}.{name}.weight_scale", (out,), f16, "scale"),
        ]

    specs = [
        TensorSpec("transformer.embedding.word_embeddings.weight", (vocab, hidden), f16, "normal"),
        TensorSpec("transformer.rotary_pos_emb.inv_freq", (kv // 4,), f16, "inv_freq"),
    ]
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        specs.append(TensorSpec(f"{p}.input_layernorm.weight", (hidden,), f16, "norm"))
        specs += linear(p, "self_attention.query_key_value")
        specs.append(TensorSpec(f"{p}.self_attention.query_key_value.bias", (qkv_out,), f16, "bias"))
        specs += linear(p, "self_attention.dense")
        specs.append(TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), f16, "norm"))
        specs += linear(p, "mlp.dense_h_to_4h")
        specs += linear(p, "mlp.dense_4h_to_h")
    specs.append(TensorSpec("transformer.encoder.final_layernorm.weight", (hidden,), f16, "norm"))
    specs.append(TensorSpec("transformer.output_layer.weight", (vocab, hidden), f16, "normal"))
    return specs


def _fill(out: torch.Tensor, spec: TensorSpec, gen: torch.Generator) -> None:
    if spec.init == "inv_freq":  # RoPE over half of each head, as the official RotaryEmbedding
        dim = 2 * spec.shape[0]
        out.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
        return
    flat = out.view(spec.shape[0], -1)
    cols = flat.shape[1] * (2 if spec.init == "int4" else 1)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, flat.shape[0], step):
        rows = min(step, flat.shape[0] - r0)
        x = torch.randn(rows, cols, generator=gen)
        if spec.init == "int4":
            # Rounded weights / (max|w| / 7): a row of N(0, s) weights has max ~3.9 s.
            chunk = int4.pack(x.mul_(7 / 3.9).round_().clamp_(-7, 7))
        elif spec.init == "scale":  # dequantised weights q * scale then have std ~0.02
            chunk = 0.02 * (3.4 + torch.rand(rows, cols, generator=gen)) / 7
        elif spec.init == "norm":
            chunk = 1 + 0.05 * x
        else:  # normal weights, qkv bias
            chunk = 0.02 * x
        flat[r0 : r0 + rows].copy_(chunk)


def _split(specs: list[TensorSpec], parts: int) -> list[list[TensorSpec]]:
    """Contiguous groups of about equal bytes (official shards hold consecutive tensors)."""
    parts = min(parts, len(specs))
    cumulative = list(np.cumsum([0] + [s.nbytes for s in specs]))
    total = cumulative[-1]
    cuts = [0]
    for k in range(1, parts):
        i = next(j for j, c in enumerate(cumulative) if c >= total * k / parts)
        cuts.append(min(max(i, cuts[-1] + 1), len(specs) - (parts - k)))
    cuts.append(len(specs))
    return [specs[a:b] for a, b in itertools.pairwise(cuts)]


def _write_bin(path: Path, specs: list[TensorSpec], gen: torch.Generator, scratch: Path) -> None:
    """torch.save a state dict whose tensors live in memory-mapped scratch files."""
    scratch.mkdir(exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(specs):
        np_dtype = np.int8 if spec.dtype == torch.int8 else np.float16
        mm = np.memmap(scratch / f"{i}.bin", dtype=np_dtype, mode="w+", shape=spec.shape)
        tensor = torch.from_numpy(mm)
        _fill(tensor, spec, gen)
        state[spec.name] = tensor
    torch.save(state, path)
    del state
    shutil.rmtree(scratch)


def default_dir(kind: Kind, tiny: bool = False) -> Path:
    return common.BENCH_CACHE / (f"{kind}-tiny" if tiny else kind)


def build_checkpoint(
    out_dir: str | Path | None = None,
    kind: Kind = "int4",
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
    tokenizer: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write (once) a random-weight checkpoint folder and return it.

    ``sizes`` overrides config fields (e.g. ``TINY_SIZES``). ``tokenizer`` defaults to the real
    ChatGLM2 tokenizer beside the checkout when present and the vocabulary fits, else the tiny
    fixture tokenizer.
    """
    if kind not in ("int4", "fp16"):
        raise ValueError(f"kind must be 'int4' or 'fp16', not {kind!r}")
    config = official_config(kind, sizes)
    out = Path(out_dir) if out_dir is not None else default_dir(kind, tiny=bool(sizes))
    identity = {"kind": kind, "seed": seed, "config": config}
    marker = out / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == identity:
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and is not a checkpoint built here")
    tok = Path(tokenizer) if tokenizer is not None else _default_tokenizer(config)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_config = {
        "name_or_path": config["_name_or_path"],
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    shutil.copyfile(tok, partial / "tokenizer.model")

    gen = torch.Generator().manual_seed(seed)
    specs = tensor_specs(config, kind)
    if kind == "int4":
        if progress:
            progress("writing pytorch_model.bin")
        _write_bin(partial / "pytorch_model.bin", specs, gen, partial / ".scratch")
    else:
        shards = _split(specs, FP16_SHARDS)
        weight_map: dict[str, str] = {}
        for n, shard in enumerate(shards, start=1):
            name = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
            if progress:
                progress(f"writing {name}")
            _write_bin(partial / name, shard, gen, partial / ".scratch")
            weight_map.update((s.name, name) for s in shard)
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (partial / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (partial / MARKER).write_text(json.dumps(identity))

    if out.exists():  # an older build of ours (its marker did not match)
        shutil.rmtree(out)
    partial.rename(out)
    return out


def _default_tokenizer(config: Mapping[str, Any]) -> Path:
    if REAL_TOKENIZER.is_file() and config["padded_vocab_size"] >= REAL_VOCAB:
        return REAL_TOKENIZER
    if not TINY_TOKENIZER.is_file():
        raise FileNotFoundError(f"no tokenizer.model found ({REAL_TOKENIZER}, {TINY_TOKENIZER})")
    return TINY_TOKENIZER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kind", choices=["int4", "fp16"], default="int4")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder (default ~/.cache/chatglm-bot/bench/KIND)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tiny fixture sizes instead of 6B")
    args = parser.parse_args(argv)
    path = build_checkpoint(
        args.out,
        kind=args.kind,
        seed=args.seed,
        sizes=TINY_SIZES if args.tiny else None,
        progress=lambda msg: print(msg, file=sys.stderr),
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
