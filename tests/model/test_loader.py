"""Checkpoint formats (single/sharded .bin and .safetensors, int4, quantize on load) and every bad case."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import save_file

from bot.model import loader
from bot.model.kernels import build
from bot.model.loader import ModelLoadError, load_model, resolve_model_path
from bot.model.model import ChatGLM2
from bot.model.quant import Int4Linear
from tests.model.fixture import expected, require_native_kernel, tiny_dir

Kind = Literal["fp32", "int4"]
PROMPT = next(p["input_ids"] for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == "zh_single")


def last_logits(path: Path, **kwargs: object) -> torch.Tensor:
    model, tokenizer, config = load_model(path, dtype="float32", device="cpu", **kwargs)  # type: ignore[arg-type]
    assert tokenizer.vocab_size == 605 and config.num_layers == 2
    model.setup_caches(1, 64)
    with torch.inference_mode():
        logits: torch.Tensor = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))[0, -1]
    return logits


def want(kind: str) -> torch.Tensor:
    return torch.tensor(expected()[kind][0]["last_logits"]["full"])


def copy_meta(kind: Kind, dest: Path) -> dict[str, torch.Tensor]:
    """Copy config and tokenizer of a fixture checkpoint into ``dest``; return its tensors."""
    dest.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny_dir(kind) / name, dest / name)
    state: dict[str, torch.Tensor] = torch.load(tiny_dir(kind) / "pytorch_model.bin", weights_only=True)
    return state


def write_sharded(dest: Path, state: dict[str, torch.Tensor], fmt: str) -> None:
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        name = (
            f"model-{i:05d}-of-00002.{fmt}" if fmt == "safetensors" else f"pytorch_model-{i:05d}-of-00002.bin"
        )
        shard = {k: state[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(shard, str(dest / name))
        else:
            torch.save(shard, dest / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (dest / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_single_bin(kind: Kind) -> None:
    torch.testing.assert_close(last_logits(tiny_dir(kind)), want(kind), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["fp32", "int4"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sharded(tmp_path: Path, kind: Kind, fmt: str) -> None:
    dest = tmp_path / "ckpt"
    write_sharded(dest, copy_meta(kind, dest), fmt)
    torch.testing.assert_close(last_logits(dest), want(kind), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_single_safetensors(tmp_path: Path, kind: Kind) -> None:
    dest = tmp_path / "ckpt"
    save_file(copy_meta(kind, dest), str(dest / "model.safetensors"))
    torch.testing.assert_close(last_logits(dest), want(kind), atol=1e-4, rtol=0)


def test_quantize_on_load_matches_int4_checkpoint(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    state = copy_meta("fp32", dest)
    torch.save({k: v.half() for k, v in state.items()}, dest / "pytorch_model.bin")  # as the fp16 release
    torch.testing.assert_close(last_logits(dest, quantize=4), want("int4"), atol=1e-4, rtol=0)
    # from fp32 weights the unquantized tensors keep full precision: close, not equal
    torch.testing.assert_close(last_logits(tiny_dir("fp32"), quantize=4), want("int4"), atol=0.05, rtol=0)


def test_config_quantization_bit_quantizes_fp16_weights(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    state = copy_meta("fp32", dest)
    torch.save({k: v.half() for k, v in state.items()}, dest / "pytorch_model.bin")
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    torch.testing.assert_close(last_logits(dest), want("int4"), atol=1e-4, rtol=0)


def int4_layer_backends(model: ChatGLM2) -> set[str]:
    return {m.backend.name for m in model.transformer.encoder.modules() if isinstance(m, Int4Linear)}


def test_auto_dtype_is_bfloat16_with_the_fastest_int4_kernel_for_an_fp16_checkpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="bot.model.loader"):
        model, _, _ = load_model(tiny_dir("int4"), device="cpu")  # config torch_dtype float16
    assert model.compute_dtype == torch.bfloat16
    want = "native" if build.available() else "packed-cpu"
    assert int4_layer_backends(model) == {want}
    assert sum(f"int4 matmul {want}" in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.mark.parametrize("int4_kernel", ["auto", "native"])
def test_native_kernel_runs_every_int4_layer_and_a_two_term_output_layer(int4_kernel: str) -> None:
    require_native_kernel()
    model, _, _ = load_model(tiny_dir("int4"), dtype="bfloat16", device="cpu", int4_kernel=int4_kernel)
    head = model.transformer.output_layer
    assert int4_layer_backends(model) == {"native"}
    assert isinstance(head, Int4Linear) and head.backend.name == "native" and head.terms == 2
    assert head.weight.numel() == 0 and model.device.type == "cpu"  # official tensors dropped


def test_int4_output_layer_can_be_kept_in_the_compute_dtype() -> None:
    model, _, _ = load_model(tiny_dir("int4"), dtype="bfloat16", device="cpu", int4_output_layer=False)
    head = model.transformer.output_layer
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.bfloat16


def test_torch_int4_kernel_keeps_pytorch_kernels_and_a_dense_output_layer() -> None:
    model, _, _ = load_model(tiny_dir("int4"), dtype="bfloat16", device="cpu", int4_kernel="torch")
    assert int4_layer_backends(model) == {"packed-cpu"}
    assert type(model.transformer.output_layer) is torch.nn.Linear


@pytest.mark.usefixtures("no_kernel")
def test_without_the_kernel_auto_falls_back_and_native_is_an_error() -> None:
    model, _, _ = load_model(tiny_dir("int4"), dtype="bfloat16", device="cpu")
    assert int4_layer_backends(model) == {"packed-cpu"}
    with pytest.raises(ModelLoadError, match="int4_kernel 'native' requested but the kernel is unavailable"):
        load_model(tiny_dir("int4"), device="cpu", int4_kernel="native")


@pytest.mark.parametrize("int4_kernel", ["auto", "native", "torch"])
def test_float32_is_the_exact_reference_whatever_the_int4_kernel(int4_kernel: str) -> None:
    if int4_kernel == "native":
        require_native_kernel()
    got = last_logits(tiny_dir("int4"), int4_kernel=int4_kernel)
    torch.testing.assert_close(got, want("int4"), atol=1e-4, rtol=0)


def test_auto_dtype_keeps_a_float32_checkpoint_exact() -> None:
    model, _, _ = load_model(tiny_dir("fp32"), device="cpu")
    assert model.compute_dtype == torch.float32


# -- bad checkpoints ------------------------------------------------------------------------------


def bad(path: Path, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_model(path, dtype="float32", device="cpu")


def test_missing_folder(tmp_path: Path) -> None:
    bad(tmp_path / "nope", "not found")


def test_no_config(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    copy_meta("fp32", dest)
    (dest / "config.json").unlink()
    bad(dest, "config not found")


def test_malformed_config(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    copy_meta("fp32", dest)
    (dest / "config.json").write_text("{not json")
    bad(dest, "cannot read")
    (dest / "config.json").write_text(json.dumps({"num_layers": -1}))
    bad(dest, "num_layers")
    (dest / "config.json").write_text(json.dumps({"rmsnorm": False}))
    bad(dest, "unsupported")


def test_no_weights(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    copy_meta("fp32", dest)
    bad(dest, "no weights")


def test_no_tokenizer(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    torch.save(copy_meta("fp32", dest), dest / "pytorch_model.bin")
    (dest / "tokenizer.model").unlink()
    bad(dest, "tokenizer")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("drop", "missing keys"),
        ("extra", "unexpected keys"),
        ("shape", "has shape"),
    ],
)
def test_key_mismatch(tmp_path: Path, edit: str, match: str) -> None:
    dest = tmp_path / "ckpt"
    state = copy_meta("fp32", dest)
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    if edit == "drop":
        del state[key]
    elif edit == "extra":
        state["transformer.encoder.layers.2.mlp.dense_4h_to_h.weight"] = state[key]
    else:
        state[key] = state[key][:, :10]
    torch.save(state, dest / "pytorch_model.bin")
    bad(dest, match)


def test_int4_with_float_weight_is_a_dtype_error(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    state = copy_meta("int4", dest)
    key = "transformer.encoder.layers.0.self_attention.dense.weight"
    state[key] = state[key].half()
    torch.save(state, dest / "pytorch_model.bin")
    bad(dest, "dtype")


def test_index_names_missing_shard(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    write_sharded(dest, copy_meta("fp32", dest), "bin")
    (dest / "pytorch_model-00002-of-00002.bin").unlink()
    bad(dest, "missing shard")


def test_index_malformed(tmp_path: Path) -> None:
    dest = tmp_path / "ckpt"
    copy_meta("fp32", dest)
    (dest / "model.safetensors.index.json").write_text("[]")
    bad(dest, "bad weight index")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_corrupt_weights(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "ckpt"
    copy_meta("fp32", dest)
    data = (tiny_dir("fp32") / "pytorch_model.bin").read_bytes()
    (dest / name).write_bytes(data[: len(data) // 2] if name.endswith(".bin") else b"garbage" * 10)
    bad(dest, "cannot read weights")


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


def test_pickled_code_is_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "ckpt"
    copy_meta("fp32", dest)
    with (dest / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"x": Exploit()}, f)
    bad(dest, "cannot read weights")
    assert "code ran" not in capsys.readouterr().out


def test_bad_options() -> None:
    with pytest.raises(ModelLoadError, match="quantize"):
        load_model(tiny_dir("fp32"), quantize=8)
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(tiny_dir("fp32"), dtype="int8", device="cpu")
    with pytest.raises(ModelLoadError, match="device"):
        load_model(tiny_dir("fp32"), device="tpu")
    with pytest.raises(ModelLoadError, match="int4_kernel"):
        load_model(tiny_dir("int4"), int4_kernel="fast")


# -- resolve_model_path -----------------------------------------------------------------------------


def test_resolve_local_folder() -> None:
    assert resolve_model_path(str(tiny_dir("fp32"))) == tiny_dir("fp32")


def test_resolve_file_is_an_error() -> None:
    with pytest.raises(ModelLoadError, match="not a folder"):
        resolve_model_path(tiny_dir("fp32") / "config.json")


def test_hub_download_failure_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def offline(**kwargs: object) -> str:
        seen.update(kwargs)
        raise OSError("We couldn't connect to 'https://huggingface.co'\nlong traceback text")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("THUDM/chatglm2-6b-int4")
    assert "\n" not in str(info.value) and "couldn't connect" in str(info.value)
    assert seen["repo_id"] == "THUDM/chatglm2-6b-int4"
    assert "tokenizer.model" in seen["allow_patterns"]  # type: ignore[operator]
    assert "*.py" not in seen["allow_patterns"]  # type: ignore[operator]


def test_hub_download_success_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **_: str(tiny_dir("int4")))
    assert resolve_model_path("someone/model") == tiny_dir("int4")
    assert loader.resolve_model_path("someone/model").is_dir()


def test_dropping_mapped_pages_keeps_the_data(tmp_path: Path) -> None:
    """MADV_DONTNEED on a torch.load(mmap=True) tensor only unmaps pages: the data re-reads from the file."""
    original = torch.arange(1 << 20, dtype=torch.int32)  # 4 MiB: many whole pages
    torch.save({"t": original}, tmp_path / "t.bin")
    tensor = torch.load(tmp_path / "t.bin", mmap=True, weights_only=True)["t"]
    assert int(tensor.sum()) == int(original.sum())  # fault the pages in
    loader._FilePages([tensor]).release(tensor)
    assert torch.equal(tensor, original)
    other = torch.ones(1 << 20)
    loader._FilePages([tensor]).release(other)  # not a mapped tensor: left alone
    assert bool((other == 1).all())
