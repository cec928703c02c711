"""ChatGLM2 hyper-parameters, read from a checkpoint's ``config.json`` (the official field names)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """config.json is unreadable, or describes a model this engine does not implement."""


# Fields of the official config.json that must hold these values: the engine implements only the
# ChatGLM2 architecture (RMSNorm pre-norm blocks, bias-free linears except qkv, final norm, GLM RoPE).
_REQUIRED = {
    "rmsnorm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "original_rope": True,
}


@dataclass(frozen=True, slots=True)
class ChatGLM2Config:
    num_layers: int = 28
    hidden_size: int = 4096
    num_attention_heads: int = 32
    kv_channels: int = 128  # head dim
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 65024
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = True
    quantization_bit: int = 0  # 4: the chatglm2-6b-int4 layout (or quantize fp16 weights on load)
    torch_dtype: str = "float16"
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        positive = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size")
        for name in (*positive, "multi_query_group_num", "padded_vocab_size", "seq_length"):
            if not _is_int(value := getattr(self, name)) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < self.padded_vocab_size:
                raise ModelConfigError(
                    f"{name} must be an integer in [0, padded_vocab_size={self.padded_vocab_size}), "
                    f"got {value!r}"
                )
        for name in ("multi_query_attention", "add_qkv_bias"):
            if not isinstance(value := getattr(self, name), bool):
                raise ModelConfigError(f"{name} must be true or false, got {value!r}")
        if not isinstance(self.torch_dtype, str):
            raise ModelConfigError(f"torch_dtype must be a string, got {self.torch_dtype!r}")
        if self.kv_channels % 4:
            raise ModelConfigError(
                f"kv_channels must be a multiple of 4 (RoPE pairs), got {self.kv_channels}"
            )
        if self.num_attention_heads % self.kv_groups:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"multi_query_group_num ({self.kv_groups})"
            )
        if not _is_int(self.quantization_bit) or self.quantization_bit not in (0, 4):
            raise ModelConfigError(
                f"quantization_bit must be the integer 4 (or 0, null), got {self.quantization_bit!r}"
            )
        if not (isinstance(self.layernorm_epsilon, float) and self.layernorm_epsilon > 0):
            raise ModelConfigError(
                f"layernorm_epsilon must be a positive number, got {self.layernorm_epsilon!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def kv_groups(self) -> int:
        """Number of key/value heads (2 for ChatGLM2-6B's multi-query attention)."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_groups * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates: the first half (64 of 128)."""
        return self.head_dim // 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ChatGLM2Config:
        for key, want in _REQUIRED.items():
            if key in raw and raw[key] != want:
                raise ModelConfigError(
                    f"unsupported ChatGLM2 variant: config {key}={raw[key]!r} (need {want!r})"
                )
        rope_ratio = raw.get("rope_ratio", 1)
        if rope_ratio != 1:
            raise ModelConfigError(f"unsupported config rope_ratio={rope_ratio!r} (long-context variants)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if values.get("quantization_bit") is None:
            values.pop("quantization_bit", None)
        if isinstance(values.get("layernorm_epsilon"), int):
            values["layernorm_epsilon"] = float(values["layernorm_epsilon"])
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ChatGLM2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelConfigError(f"config not found: {path}") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(raw)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_name(cls, name: str) -> ChatGLM2Config:
        try:
            return PRESETS[name]
        except KeyError:
            raise ModelConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


PRESETS: dict[str, ChatGLM2Config] = {
    "chatglm2-6b": ChatGLM2Config(),
    "chatglm2-6b-int4": ChatGLM2Config(quantization_bit=4),
}
