"""Token generation: prefill, one-token decode steps, sampling as the official ``chat`` does.

The official ``chat``/``stream_chat`` call ``generate(do_sample=True, temperature=0.8, top_p=0.8)`` with
transformers' default ``top_k=50``: warpers applied in the order temperature, top-k, top-p, after the
``InvalidScoreLogitsProcessor`` (any NaN/inf score -> all scores 0 except token 5 = 5e4). Ids at or
above the tokenizer's vocabulary (the padded rows of the output layer) are never tokens and are masked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bot.model.model import ChatGLM2

MAX_LENGTH = 8192  # the official chat()'s max_length: prompt + answer tokens
INVALID_SCORE_TOKEN = 5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.8
    top_k: int = 50  # 0: no top-k filter

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(slots=True)
class GenerationOutput:
    tokens: list[int]  # new tokens, including a final eos if one was produced
    stopped: bool  # should_stop() ended it
    first_logits: torch.Tensor  # raw float32 logits [V] at the last prompt position
    prefill_s: float
    decode_s: float


def guard_invalid_scores(logits: torch.Tensor) -> torch.Tensor:
    """The official InvalidScoreLogitsProcessor: NaN/inf anywhere -> force token 5."""
    if not bool(torch.isfinite(logits).all()):
        logits = torch.zeros_like(logits)
        logits[..., INVALID_SCORE_TOKEN] = 5e4
    return logits


def mask_non_tokens(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if logits.shape[-1] > vocab_size:
        logits = logits.clone()
        logits[..., vocab_size:] = -float("inf")
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [B, V] (already guarded and masked) -> ids [B]; greedy when temperature == 0."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature  # transformers' TemperatureLogitsWarper
    kept = top_k_probs(scores, params)
    if kept is not None:
        # The exponential race torch.multinomial runs for one sample (argmax p / E, E ~ Exp(1)), with one
        # draw per id of the whole row as it makes them: a tiny change in the scores that reorders ties
        # or moves the top-k boundary then changes no other id's draw. The draws are float64 uniforms
        # (cheaper than exponential_), made exponential for the kept ids only.
        probs, ids = kept
        uniform = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
        race = uniform.uniform_(generator=generator).gather(-1, ids).neg_().log1p_().neg_()  # [B, n], E >= 0
        race.clamp_min_(torch.finfo(torch.float64).tiny)  # u == 0 gives E == 0: p / 0 would be NaN at p == 0
        return ids.gather(-1, (probs.double() / race).argmax(dim=-1, keepdim=True)).squeeze(-1)
    from transformers.generation.logits_process import (  # imported late: ~2 s, only when needed
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def top_k_probs(scores: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What transformers' top-k then top-p warpers and a softmax give, on the best scores only:
    (probabilities [B, n], their ids [B, n]). The other ids are -inf after top-k, so they change neither
    top-p's cumulative sums nor the softmax, and top-p need not sort the whole row. None without a top-k
    below the row's size: the caller then runs the warpers."""
    if not 0 < params.top_k < scores.shape[-1]:
        return None
    values, ids = scores.topk(params.top_k, dim=-1)  # [B, k], best first
    kth = values[:, -1:]
    tied = int((scores >= kth).sum(dim=-1).max())
    if tied > params.top_k:  # top-k keeps every id tied with the k-th score (common in bfloat16)
        values, ids = scores.topk(tied, dim=-1)
        values = values.masked_fill(values < kth, -float("inf"))
    if params.top_p < 1.0:  # as TopPLogitsWarper: drop the low end whose total is <= 1 - top_p
        ascending = values.flip(-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p
        drop[:, -1] = False  # min_tokens_to_keep = 1
        values = ascending.masked_fill(drop, -float("inf")).flip(-1)
    return torch.softmax(values, dim=-1), ids


def next_token(
    logits: torch.Tensor, vocab_size: int, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """One id from raw logits [V]."""
    scores = mask_non_tokens(guard_invalid_scores(logits[None].float()), vocab_size)
    return int(sample(scores, params, generator)[0])


@torch.inference_mode()
def prefill(model: ChatGLM2, prompt: torch.Tensor) -> torch.Tensor:
    """prompt [S] at positions 0..S-1 -> raw logits [V] at the last position."""
    positions = torch.arange(prompt.shape[0], device=prompt.device)
    logits: torch.Tensor = model(prompt[None], positions, last_only=True)
    return logits[0, -1]


@torch.inference_mode()
def decode_one_token(model: ChatGLM2, token: int, position: int) -> torch.Tensor:
    device = model.device
    ids = torch.tensor([[token]], device=device)
    logits: torch.Tensor = model(ids, torch.tensor([position], device=device), last_only=True)
    return logits[0, -1]


def generate(
    model: ChatGLM2,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    eos_id: int,
    vocab_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_length: int = MAX_LENGTH,
) -> GenerationOutput:
    """Prefill ``prompt`` then decode until eos, ``max_new_tokens``, ``max_length`` total tokens or
    ``should_stop()`` (checked before every token). ``on_token`` gets each new id (eos included)."""
    if not prompt:
        raise ValueError("empty prompt")
    limit = min(max_length, model.config.seq_length)
    budget = min(max_new_tokens, limit - len(prompt))
    if budget < 1:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under the {limit}-token limit")
    if model.max_seq_len < limit or model.max_batch < 1:
        model.setup_caches(1, limit)  # once: slot == position, so later prompts reuse it
    device = model.device
    started = time.perf_counter()
    logits = prefill(model, torch.tensor(list(prompt), device=device))
    first_logits = logits.float().cpu()
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    tokens: list[int] = []
    stopped = False
    while len(tokens) < budget:
        if should_stop is not None and should_stop():
            stopped = True
            break
        token = next_token(logits, vocab_size, params, generator)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id or len(tokens) == budget:
            break
        logits = decode_one_token(model, token, len(prompt) + len(tokens) - 1)
    return GenerationOutput(tokens, stopped, first_logits, prefill_s, time.perf_counter() - started)
