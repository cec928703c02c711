"""Decoding: greedy parity with the official generate, limits, stop callback, guards, sampling."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bot.model.loader import load_model
from bot.model.model import ChatGLM2
from bot.model.sampling import (
    INVALID_SCORE_TOKEN,
    SamplingParams,
    generate,
    guard_invalid_scores,
    mask_non_tokens,
    next_token,
    sample,
    top_k_probs,
)
from tests.model.fixture import expected, tiny_dir

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 605  # tiny tokenizer: 600 pieces + 5 specials; the model has 640 rows


def prompt(name: str) -> list[int]:
    return next(p["input_ids"] for p in expected()["tokenizer"]["chat_prompts"] if p["name"] == name)


@pytest.fixture(scope="module", params=["fp32", "int4"])
def loaded(request: pytest.FixtureRequest) -> tuple[str, ChatGLM2]:
    model, _, _ = load_model(tiny_dir(request.param), dtype="float32", device="cpu")
    return request.param, model


def run(model: ChatGLM2, ids: list[int], **kwargs: Any) -> Any:
    options: dict[str, Any] = {"max_new_tokens": 8, "eos_id": 2, "vocab_size": VOCAB, "params": GREEDY}
    return generate(model, ids, **{**options, **kwargs})


def test_greedy_matches_official(loaded: tuple[str, ChatGLM2]) -> None:
    kind, model = loaded
    for case in expected()[kind]:
        out = run(model, prompt(case["name"]))
        assert out.tokens == case["greedy_8_no_eos_stop_ids"] == case["greedy_generate_ids"]
        assert not out.stopped
        torch.testing.assert_close(
            out.first_logits[:16], torch.tensor(case["last_logits"]["first16"]), atol=1e-4, rtol=0
        )


def test_max_new_tokens_and_streamed_ids(loaded: tuple[str, ChatGLM2]) -> None:
    _, model = loaded
    seen: list[int] = []
    out = run(model, prompt("en_single"), max_new_tokens=3, on_token=seen.append)
    assert out.tokens == seen and len(seen) == 3


def test_total_length_limit(loaded: tuple[str, ChatGLM2]) -> None:
    _, model = loaded
    ids = prompt("en_single")
    out = run(model, ids, max_new_tokens=100, max_length=len(ids) + 2)
    assert len(out.tokens) == 2
    with pytest.raises(ValueError, match="no room"):
        run(model, ids, max_length=len(ids))
    with pytest.raises(ValueError, match="empty"):
        run(model, [])


def test_stop_callback_checked_before_every_token(loaded: tuple[str, ChatGLM2]) -> None:
    _, model = loaded
    calls: list[int] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    out = run(model, prompt("zh_single"), should_stop=should_stop)
    assert out.stopped and len(out.tokens) == 3 and len(calls) == 4


def test_stops_at_eos(loaded: tuple[str, ChatGLM2]) -> None:
    kind, model = loaded
    case = expected()[kind][0]
    eos = case["greedy_8_no_eos_stop_ids"][2]  # pretend the third greedy token is eos
    out = run(model, prompt(case["name"]), eos_id=eos)
    assert out.tokens == case["greedy_8_no_eos_stop_ids"][:3]


def test_seeded_sampling_is_reproducible(loaded: tuple[str, ChatGLM2]) -> None:
    _, model = loaded
    params = SamplingParams()
    a = run(model, prompt("zh_single"), params=params, generator=torch.Generator().manual_seed(5))
    b = run(model, prompt("zh_single"), params=params, generator=torch.Generator().manual_seed(5))
    assert a.tokens == b.tokens and all(t < VOCAB for t in a.tokens)


def test_invalid_scores_force_token_5() -> None:
    logits = torch.randn(1, 640)
    assert torch.equal(guard_invalid_scores(logits), logits)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = logits.clone()
        broken[0, 17] = bad
        guarded = guard_invalid_scores(broken)
        assert int(guarded.argmax()) == INVALID_SCORE_TOKEN and float(guarded[0, 0]) == 0.0
    nan = torch.full((640,), float("nan"))
    assert next_token(nan, VOCAB, SamplingParams(), torch.Generator().manual_seed(0)) == INVALID_SCORE_TOKEN


def test_masked_ids_are_never_chosen() -> None:
    logits = torch.zeros(640)
    logits[VOCAB:] = 100.0  # the padded rows win by far
    assert next_token(logits, VOCAB, GREEDY, None) < VOCAB
    gen = torch.Generator().manual_seed(0)
    wide = SamplingParams(temperature=1.0, top_p=1.0, top_k=0)
    assert all(next_token(logits, VOCAB, wide, gen) < VOCAB for _ in range(200))
    assert torch.isinf(mask_non_tokens(logits[None], VOCAB)[0, VOCAB:]).all()


def test_top_k_and_top_p_restrict_the_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    top2 = {int(sample(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=2), gen)) for _ in range(300)}
    assert top2 == {0, 1}
    # softmax: 0.66, 0.24, ...: top_p 0.5 keeps only the first
    top_p = {
        int(sample(logits, SamplingParams(temperature=1.0, top_p=0.5, top_k=0), gen)) for _ in range(100)
    }
    assert top_p == {0}
    assert int(sample(logits, GREEDY)) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k")],
)
def test_bad_sampling_params(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(0.8, 0.8, 50), (1.0, 1.0, 50), (0.5, 0.3, 7), (1.3, 0.95, 300)]
)
def test_top_k_shortcut_gives_the_warpers_distribution(temperature: float, top_p: float, top_k: int) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    scores = torch.randn(3, 65024, generator=torch.Generator().manual_seed(top_k)) * 3 / temperature
    warped = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    want = torch.softmax(warped, dim=-1)
    kept = top_k_probs(scores, params)
    assert kept is not None
    probs, ids = kept
    got = torch.zeros_like(want).scatter_(-1, ids, probs)
    assert torch.allclose(got, want, atol=1e-6)
    assert (want > 0).sum() >= 1 and ((got > 0) == (want > 0)).all()


def test_top_k_shortcut_keeps_ties_at_the_kth_score_as_top_k_does() -> None:
    scores = torch.tensor([[3.0, 2.0, 2.0, 1.0], [3.0, 2.5, 2.0, 1.0]])  # row 0: top-2 keeps three ids
    kept = top_k_probs(scores, SamplingParams(temperature=1.0, top_p=1.0, top_k=2))
    assert kept is not None
    got = torch.zeros_like(scores).scatter_(-1, kept[1], kept[0])
    want = torch.softmax(torch.tensor([[3.0, 2.0, 2.0, -1e9], [3.0, 2.5, -1e9, -1e9]]), dim=-1)
    assert torch.allclose(got, want, atol=1e-6)
    assert top_k_probs(scores, SamplingParams(top_k=0)) is None  # no top-k: the warpers' path
    gen = torch.Generator().manual_seed(0)
    tie = {
        int(sample(scores[:1], SamplingParams(temperature=1.0, top_p=1.0, top_k=2), gen)) for _ in range(300)
    }
    assert tie == {0, 1, 2}


def test_sampling_draws_with_the_kept_probabilities() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-5.0] * 60])
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=2)
    draws = torch.cat([sample(logits, params, gen) for _ in range(4000)])
    share = float((draws == 0).float().mean())
    assert set(draws.tolist()) == {0, 1}
    assert abs(share - 0.7311) < 0.03  # e^2 / (e^2 + e^1)
