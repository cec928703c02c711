"""The compiled decode attention (attention.cpp) for bfloat16 caches: within one bfloat16 rounding of
the float32 reference, independent of the batch, used by the model's decode steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.model.kernels import ops
from bot.model.loader import load_model
from bot.model.model import decode_attention
from bot.model.native_layers import use_native_layers
from tests.model.fixture import expected, require_native_kernel, tiny_dir

BF16_STEP = 2.0**-7  # bfloat16's relative spacing: its rounding moves a value by at most half of it


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    require_native_kernel()


def caches(batch: int, slots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, 32, 128, generator=gen) * 2).bfloat16()
    k = (torch.randn(batch, 2, slots, 128, generator=gen) * 2).bfloat16()
    v = torch.randn(batch, 2, slots, 128, generator=gen).bfloat16()
    return q, k, v


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """model.decode_attention in float32 over the same values: [B, H, D]."""
    slots = k.shape[2]
    mask = (torch.arange(slots)[None, :] <= positions[:, None])[:, None, None, :]
    out = decode_attention(q.float()[:, :, None], k.float(), v.float(), mask)
    return out[:, :, 0]


@pytest.mark.parametrize(("batch", "slots"), [(1, 1), (1, 64), (3, 65), (8, 300), (2, 1200)])
def test_within_one_bfloat16_rounding_of_the_float32_reference(batch: int, slots: int) -> None:
    q, k, v = caches(batch, slots, seed=slots)
    positions = torch.randint(0, slots, (batch,), generator=torch.Generator().manual_seed(1))
    positions[0] = slots - 1
    got = ops.decode_attention(q, k, v, positions)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == q.shape
    want = reference(q, k, v, positions)
    assert ((got.float() - want).abs() <= BF16_STEP * want.abs() + 1e-5).all()


def test_slots_after_a_rows_position_are_not_read() -> None:
    q, k, v = caches(2, 40, seed=3)
    positions = torch.tensor([9, 39])
    before = ops.decode_attention(q, k, v, positions)
    k[0, :, 10:] = 1e4  # row 0 must not see them; would dominate its softmax if it did
    v[0, :, 10:] = float("nan")
    after = ops.decode_attention(q, k, v, positions)
    assert before is not None and after is not None
    assert torch.equal(before, after)


def test_a_rows_output_does_not_depend_on_the_batch() -> None:
    q, k, v = caches(8, 200, seed=4)
    positions = torch.tensor([199, 0, 17, 64, 65, 150, 3, 100])
    together = ops.decode_attention(q, k, v, positions)
    alone = [
        ops.decode_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], positions[i : i + 1]) for i in range(8)
    ]
    assert together is not None
    assert torch.equal(together, torch.cat([row for row in alone if row is not None]))


def test_unsupported_shapes_fall_back_and_bad_positions_are_refused() -> None:
    q, k, v = caches(1, 8, seed=5)
    assert ops.decode_attention(q[..., :120], k[..., :120], v[..., :120], torch.tensor([3])) is None
    with pytest.raises(RuntimeError, match="outside the 8 cache slots"):
        ops.decode_attention(q, k, v, torch.tensor([8]))


def decode_logits(path: Path) -> torch.Tensor:
    """The tiny int4 model in bfloat16: a prompt, then 6 greedy decode steps; their logits."""
    model, _, _ = load_model(path, dtype="bfloat16", device="cpu")
    use_native_layers(model, fused_decode=False)  # the layers' Python modules, which call decode_attention
    model.setup_caches(1, 256)
    ids = expected()["tokenizer"]["chat_prompts"][0]["input_ids"]
    steps = []
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(len(ids)), last_only=True)
        for position in range(len(ids), len(ids) + 6):
            token = int(logits[0, -1].argmax())
            logits = model(torch.tensor([[token]]), torch.tensor([position]), last_only=True)
            steps.append(logits[0, -1])
    return torch.stack(steps)


def test_the_models_decode_steps_use_it_and_stay_close_to_pytorchs_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    compiled = ops.decode_attention

    def counted(*args: torch.Tensor) -> torch.Tensor | None:
        calls.append(1)
        return compiled(*args)

    monkeypatch.setattr(ops, "decode_attention", counted)  # the module bot.model.model calls
    fast = decode_logits(tiny_dir("int4"))
    assert calls  # every decode step's layers took the compiled attention
    monkeypatch.setattr(ops, "decode_attention", lambda *args: None)
    torch_path = decode_logits(tiny_dir("int4"))
    spread = torch_path.std(dim=-1, keepdim=True)
    assert ((fast - torch_path).abs() <= 0.02 * spread).all()
