"""Load a ChatGLM2 checkpoint folder: config.json + tokenizer.model + weights.

Weights: ``model.safetensors[.index.json]`` or ``pytorch_model.bin[.index.json]`` (sharded or not).
Nothing from the folder is executed: ``.bin`` files are read with ``torch.load(weights_only=True)``
(memory-mapped), the model is built on the meta device and the tensors are assigned into it.

The int4 layout (``weight`` int8 + ``weight_scale``) loads as is; fp16 weights are quantized on load
when config.json says ``quantization_bit: 4`` or ``quantize=4`` is asked (the official ``quantize(4)``).

The int4 matmul backend (``int4_kernel``) is chosen here and logged once per load: the native
kernel (AVX512-VNNI or AVX2) for bfloat16 compute on CPU where it is available (it then also runs the
output layer, quantized on load as two int4 terms), else PyTorch's packed int4 kernel; float32 compute
always runs the exact dequantized reference. Why, with the measurements: bot/model/README.md.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from bot.model import int4
from bot.model.config import ChatGLM2Config, ModelConfigError
from bot.model.kernels import build
from bot.model.model import QUANTIZED_LINEARS, ChatGLM2
from bot.model.native_layers import use_native_layers
from bot.model.quant import int4_backends, prepare_int4, swap_linears_for_int4
from bot.model.tokenizer import ChatGLMTokenizer

logger = logging.getLogger(__name__)


_IGNORED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)  # recomputed (the official code does too)
_HUB_PATTERNS = [
    "config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "*.safetensors",
    "*.bin",
    "*.json",
]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INT4_KERNELS = ("auto", "native", "torch")
_OUTPUT_LAYER = "output_layer"
# The output layer's int4 form on the native kernel: two terms keep the logits at about int8 precision
# (one term flips greedy tokens; tests/model/test_fast_path.py), far cheaper than bf16 (bot/model/README.md).
OUTPUT_LAYER_TERMS = 2


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be loaded; the message says why and where."""


def resolve_model_path(path_or_hub_id: str | os.PathLike[str]) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded (config, tokenizer, weights)."""
    text = os.fspath(path_or_hub_id)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"model path is not a folder: {local}")
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model folder not found: {local}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the caller
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model folder {local} not found and hub download of {text!r} failed: {first_line} "
            "(download the checkpoint folder once, see the README's quick start, and set "
            "BOT_MODEL_PATH to it)"
        ) from None


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantize: int | None = None,
    int4_kernel: str = "auto",
    int4_output_layer: bool = True,
) -> tuple[ChatGLM2, ChatGLMTokenizer, ChatGLM2Config]:
    """Load ``path`` (folder or hub id) on ``device`` (auto, cpu, cuda).

    ``dtype`` (auto, float32, bfloat16, float16) is the compute dtype. ``float32`` reproduces the
    official CPU computation exactly. ``auto`` keeps a float32 checkpoint in float32 (the official
    code does too) and otherwise picks bfloat16 on CPU (the packed int4 kernels; ~30x faster than
    float32 activations there, while CPU float16 matmuls are slow) and float16 on CUDA.
    ``int4_kernel`` (auto, native, torch) picks the int4 matmul of a bfloat16 CPU model: ``auto`` the
    native kernel where it is available, ``native`` requires it, ``torch`` forces PyTorch's kernels. With
    the native kernel, ``int4_output_layer`` also quantizes the output layer (the official int4
    arithmetic; False keeps it in the compute dtype).
    The KV caches are not allocated here (``model.setup_caches``)."""
    if quantize not in (None, 4):
        raise ModelLoadError(f"quantize={quantize!r} is not supported (only 4)")
    if int4_kernel not in _INT4_KERNELS:
        raise ModelLoadError(f"unknown int4_kernel {int4_kernel!r} ({', '.join(_INT4_KERNELS)})")
    if int4_kernel == "native" and not build.available():
        raise ModelLoadError(
            f"int4_kernel 'native' requested but the kernel is unavailable: {build.backend_name()}"
        )
    target = _pick_device(device)
    folder = resolve_model_path(path)
    try:
        config = ChatGLM2Config.from_json(folder / "config.json")
    except ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    tokenizer_path = folder / "tokenizer.model"
    try:
        tokenizer = ChatGLMTokenizer.from_file(tokenizer_path)
    except (OSError, ValueError) as exc:
        message = str(exc)
        raise ModelLoadError(
            message if str(tokenizer_path) in message else f"{tokenizer_path}: {message}"
        ) from None
    if tokenizer.vocab_size > config.padded_vocab_size:
        raise ModelLoadError(
            f"{tokenizer_path} has {tokenizer.vocab_size} ids but config.json "
            f"padded_vocab_size is only {config.padded_vocab_size}"
        )
    compute = _pick_dtype(dtype, target, config)
    state: dict[str, torch.Tensor] = {}
    file_mapped: list[torch.Tensor] = []
    for key, tensor, is_mapped in _read_weights(folder):
        if key not in _IGNORED_KEYS:
            state[key] = tensor
            if is_mapped:
                file_mapped.append(tensor)
    mapped = _FilePages(file_mapped)
    packed_int4 = any(key.endswith(".weight_scale") for key in state)
    quantized = packed_int4 or quantize == 4 or config.quantization_bit == 4
    with torch.device("meta"):
        model = ChatGLM2(config, compute, quantized=packed_int4)  # the checkpoint's own layout
    _check_keys(model, state, folder)
    if quantized and not packed_int4:
        _quantize_state(state, mapped.release)
        with torch.device("meta"):
            model = ChatGLM2(config, compute, quantized=True)
    use_native, why = _pick_int4_kernel(int4_kernel, compute, target) if quantized else (False, "")
    if use_native and int4_output_layer:
        key = f"transformer.{_OUTPUT_LAYER}.weight"
        head = state[key]
        state[key], state[key + "_scale"] = int4.quantize_terms(head, OUTPUT_LAYER_TERMS)
        mapped.release(head)
        del head
        swap_linears_for_int4(model.transformer, (_OUTPUT_LAYER,), compute, OUTPUT_LAYER_TERMS)
    state = {key: _cast(key, tensor, compute, mapped.release) for key, tensor in state.items()}
    model.load_state_dict(state, assign=True)
    del state
    model = model.to(target)
    for module in (*model.blocks, model.transformer.output_layer):
        prepare_int4(module, compute, mapped.release, use_native=use_native)
        mapped.trim_heap()
    model.eval().requires_grad_(False)
    if use_native_layers(model, pointwise=use_native):
        why += "; RMSNorm, SwiGLU and RoPE compiled"
    kind = f"int4 matmul {', '.join(int4_backends(model))} ({why})" if quantized else "dense"
    logger.info("loaded %s (%s, %s on %s)", folder, kind, compute, target)
    return model, tokenizer, config


def _pick_int4_kernel(int4_kernel: str, compute: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether int4 layers use the native kernel, and why (for the load log). It serves bfloat16
    activations on CPU; float32 stays the exact reference."""
    if compute != torch.bfloat16 or device.type != "cpu":
        return False, f"native kernel: not for {str(compute).removeprefix('torch.')} on {device.type}"
    if int4_kernel == "torch":
        return False, "native kernel: off, int4_kernel=torch"
    if build.available():  # "native" was checked up front; "auto" falls back to PyTorch's kernels
        return True, "native kernel: available"
    return False, f"native kernel: {build.backend_name()}"


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but CUDA is not available")
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r} (auto, cpu, cuda)")
    return torch.device(device)


def _pick_dtype(dtype: str, device: torch.device, config: ChatGLM2Config) -> torch.dtype:
    if dtype == "auto":
        if config.torch_dtype == "float32":
            return torch.float32
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return _DTYPES[dtype]


class _FilePages:
    """Drops the resident pages of memory-mapped checkpoint tensors once they are converted.

    ``torch.load(mmap=True)`` maps the file privately; pages read while converting (int4 repacking,
    dtype casts, quantizing) would otherwise stay in this process's RSS until the whole file is
    unmapped, on top of the converted copies (~2.9 GB extra for the int4 model). ``MADV_DONTNEED`` on
    a clean private file mapping only unmaps those pages (the data stays readable from the file), and
    it is applied only to the whole pages inside tensors that came from such a mapping.
    """

    _MADV_DONTNEED = 4

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self._ptrs = {t.data_ptr() for t in tensors}
        self._libc = _glibc() if self._ptrs else None

    def trim_heap(self) -> None:
        """Return freed conversion temporaries to the OS: glibc keeps them in the heap otherwise
        (measured: ~0.6 GB of the full model's peak RSS)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def release(self, tensor: torch.Tensor) -> None:
        if self._libc is None or tensor.data_ptr() not in self._ptrs:
            return
        page = mmap.PAGESIZE
        start = -(-tensor.data_ptr() // page) * page
        end = (tensor.data_ptr() + tensor.nbytes) // page * page
        if end > start:
            self._libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), self._MADV_DONTNEED)


def _glibc() -> ctypes.CDLL | None:
    """The C library when it has madvise and malloc_trim (Linux glibc); None elsewhere."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise, libc.malloc_trim  # noqa: B018 - probe both symbols
    except (OSError, AttributeError):
        return None
    return libc


def _cast(
    key: str, tensor: torch.Tensor, compute: torch.dtype, release: Callable[[torch.Tensor], None]
) -> torch.Tensor:
    """Float tensors to the compute dtype; int4 payloads and scales stay as stored. The embedding is
    cast per looked-up row in forward, so it stays in its (memory-mapped) storage dtype."""
    if not tensor.is_floating_point() or key.endswith(".weight_scale") or tensor.dtype == compute:
        return tensor
    if key == "transformer.embedding.word_embeddings.weight" and compute != torch.float32:
        return tensor
    cast = tensor.to(compute)
    release(tensor)
    return cast


def _quantize_state(state: dict[str, torch.Tensor], release: Callable[[torch.Tensor], None]) -> None:
    for key in [k for k in state if k.endswith(".weight") and k.split(".")[-2] in QUANTIZED_LINEARS]:
        packed, scale = int4.quantize(state[key])
        release(state[key])
        state[key] = packed
        state[key + "_scale"] = scale


def _check_keys(model: ChatGLM2, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        raise ModelLoadError(f"checkpoint {folder} does not match the config: {'; '.join(parts)}")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise ModelLoadError(
                f"checkpoint {folder}: {key} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        if got.is_floating_point() != want.is_floating_point():
            raise ModelLoadError(f"checkpoint {folder}: {key} has dtype {got.dtype}, expected {want.dtype}")


def _read_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, whether the tensor is memory-mapped from the file) for every stored tensor."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            for shard in _shards(folder, index_name):
                yield from _read_file(shard)
            return
        if (folder / single_name).is_file():
            yield from _read_file(folder / single_name)
            return
    raise ModelLoadError(
        f"no weights in {folder} (looked for model.safetensors[.index.json], pytorch_model.bin[.index.json])"
    )


def _shards(folder: Path, index_name: str) -> list[Path]:
    try:
        index = json.loads((folder / index_name).read_text(encoding="utf-8"))
        names = sorted(set(index["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"bad weight index {folder / index_name}: {exc!r}") from None
    shards = []
    for name in names:
        shard = (folder / str(name)).resolve()
        if shard.parent != folder.resolve():
            raise ModelLoadError(f"weight index {folder / index_name} points outside the folder: {name}")
        if not shard.is_file():
            raise ModelLoadError(f"weight index {folder / index_name} names a missing shard: {name}")
        shards.append(shard)
    return shards


def _read_file(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: not repeated here
        raise ModelLoadError(
            f"cannot read weights {path}: refused, it holds pickled objects other than tensors"
        ) from None
    except Exception as exc:  # torch/safetensors raise many types for truncated or foreign files
        raise ModelLoadError(
            f"cannot read weights {path}: truncated or not a checkpoint ({_first_sentence(exc)})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelLoadError(f"{path} is not a state dict of tensors")
    for key, tensor in state.items():
        yield key, tensor, path.suffix == ".bin"  # torch.load(mmap=True): a private file mapping


def _first_sentence(exc: Exception) -> str:
    """``Type: first sentence``: torch's and safetensors' messages go on with multi-line advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0].rstrip('.')}"
