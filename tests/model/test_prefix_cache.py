"""Prefix KV reuse: exact same output as a full prefill over several turns, fallback, memory bound."""

from __future__ import annotations

import pytest
import torch

from bot.generation import GenerationParams, GenerationRequest, Turn
from bot.model.engine import ChatGLM2Generator, ChatState, next_turn_text
from bot.model.kv_cache import read_kv
from bot.model.prefix_cache import CachedPrefix, PrefixCache, common_prefix_length
from bot.model.tokenizer import ChatGLMTokenizer
from tests.model.fixture import real_tokenizer_path, tiny_dir

QUERIES = ("What is the capital of France?", "你好", "tell me a story", "天气怎么样", "and then?")
GREEDY = GenerationParams(max_new_tokens=10, temperature=0.0)


def entry(tokens: int) -> CachedPrefix:
    return CachedPrefix(tuple(range(tokens)), torch.zeros(1, 2, 1, tokens, 1))  # 8 bytes per token


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([9], [1]) == 0


def test_lru_eviction_within_the_byte_limit() -> None:
    one = entry(10).nbytes
    cache = PrefixCache(3 * one)
    for key in "abc":
        cache.put(key, entry(10))
    assert cache.take("a") is not None  # a running turn takes its entry out...
    cache.put("a", entry(10))  # ...and puts the longer one back as the most recent
    cache.put("d", entry(10))  # evicts b, the least recently used
    assert cache.take("b") is None and len(cache) == 3 and cache.total_bytes == 3 * one
    cache.put("big", entry(40))  # larger than the whole limit: not kept, nothing evicted
    assert len(cache) == 3 and cache.take("big") is None
    cache.put("c", entry(20))  # replacing c with a bigger entry evicts the oldest others
    assert cache.total_bytes <= 3 * one and cache.take("c") is not None
    disabled = PrefixCache(0)
    disabled.put("a", entry(1))
    assert len(disabled) == 0
    with pytest.raises(ValueError):
        PrefixCache(-1)


@pytest.fixture(scope="module", params=["fp32", "int4"])
def pair(request: pytest.FixtureRequest) -> tuple[ChatGLM2Generator, ChatGLM2Generator]:
    """float32 compute: in bfloat16 a split prefill's attention may differ in the last bit."""
    path = tiny_dir(request.param)
    cached = ChatGLM2Generator.load(path, dtype="float32", device="cpu", max_batch_size=2)
    plain = ChatGLM2Generator.load(path, dtype="float32", device="cpu", max_batch_size=2, prefix_cache_mb=0)
    return cached, plain


def turn(
    generator: ChatGLM2Generator, request: GenerationRequest, idle: bool = True
) -> tuple[ChatState, str]:
    """One turn, then (``idle``) the idle work the model service would run before the next one."""
    state = generator.begin(request, lambda _d: None, lambda: False)
    while not state.done:
        generator.step([state])
    text = generator.finish(state).text
    while idle and generator.idle_step():
        pass
    return state, text


def test_turns_reuse_the_prefix_with_identical_output(
    pair: tuple[ChatGLM2Generator, ChatGLM2Generator],
) -> None:
    cached, plain = pair
    history: tuple[Turn, ...] = ()
    previous_prompt = 0
    for number, query in enumerate(QUERIES):
        request = GenerationRequest(query=query, history=history, params=GREEDY, conversation="c1")
        state, text = turn(cached, request)
        reference, reference_text = turn(plain, request)
        assert state.tokens == reference.tokens and text == reference_text
        torch.testing.assert_close(state.first_logits, reference.first_logits, atol=1e-5, rtol=0)
        assert reference.reused == 0
        if number == 0:
            assert state.reused == 0
        else:  # everything but this turn's query (the answer's ids were re-canonicalised at finish)
            query_ids = cached.count_tokens(query)
            assert state.reused >= len(state.prompt_ids) - query_ids - 6 > previous_prompt
        previous_prompt = len(state.prompt_ids)
        history = (*history, (query, text))
    assert len(cached.prefix_cache) == 1 and len(plain.prefix_cache) == 0


def test_trimmed_or_edited_history_falls_back(pair: tuple[ChatGLM2Generator, ChatGLM2Generator]) -> None:
    cached, plain = pair
    history: tuple[Turn, ...] = ()
    for query in QUERIES[:3]:
        request = GenerationRequest(query=query, history=history, params=GREEDY, conversation="c2")
        history = (*history, (query, turn(cached, request)[1]))
    first_prompt = cached.prompt_tokens(QUERIES[0], ())
    for changed in (history[1:], (("edited", "history"), *history[1:])):
        request = GenerationRequest(query="next", history=changed, params=GREEDY, conversation="c2")
        prompt = cached.tokenizer.build_chat_input("next", changed)
        current = cached.prefix_cache.take("c2")
        assert current is not None
        cached.prefix_cache.put("c2", current)
        state, text = turn(cached, request)
        reference, reference_text = turn(plain, request)
        # only the shared "[gMASK] sop [Round 1] 问：" head, not even the first turn's prompt
        assert state.reused == common_prefix_length(current.ids, prompt) < first_prompt
        assert state.tokens == reference.tokens and text == reference_text


def test_stopped_turn_keeps_only_valid_kv(pair: tuple[ChatGLM2Generator, ChatGLM2Generator]) -> None:
    cached, plain = pair
    first = GenerationRequest(query=QUERIES[0], params=GREEDY, conversation="c3")
    state = cached.begin(first, lambda _d: None, lambda: len(state.tokens) >= 4)
    while not state.done:
        cached.step([state])
    partial = cached.finish(state)
    assert partial.stopped
    kept = cached.prefix_cache.take("c3")
    assert kept is not None and len(kept.ids) == kept.kv.shape[3] == len(state.prompt_ids)
    cached.prefix_cache.put("c3", kept)
    request = GenerationRequest(
        query=QUERIES[1], history=((QUERIES[0], partial.text),), params=GREEDY, conversation="c3"
    )
    again, text = turn(cached, request)
    reference, reference_text = turn(plain, request)
    assert again.reused == len(state.prompt_ids)
    assert again.tokens == reference.tokens and text == reference_text


def test_memory_bound_holds_under_50_conversations() -> None:
    generator = ChatGLM2Generator.load(tiny_dir("fp32"), dtype="float32", device="cpu", max_batch_size=4)
    one_turn = read_kv(generator.model.caches(), 0, 40).nbytes  # about one short turn's KV
    limit = 5 * one_turn
    generator.prefix_cache = PrefixCache(limit)
    params = GenerationParams(max_new_tokens=3, temperature=0.0)
    for n in range(50):
        request = GenerationRequest(query=f"question {n}", params=params, conversation=f"conv{n}")
        turn(generator, request)
        assert generator.prefix_cache.total_bytes <= limit
    assert 3 <= len(generator.prefix_cache) <= 5
    assert generator.prefix_cache.take("conv49") is not None
    assert generator.prefix_cache.take("conv0") is None


@pytest.mark.parametrize("tokenizer_kind", ["tiny", "real"])
def test_next_prompt_starts_with_the_kept_ids(tokenizer_kind: str) -> None:
    """What finish() keeps (prompt + answer + next round header, canonically encoded) is, to the
    token, the start of the next turn's prompt, whatever the next query; never assumed, checked."""
    path = real_tokenizer_path() if tokenizer_kind == "real" else tiny_dir("fp32") / "tokenizer.model"
    tokenizer = ChatGLMTokenizer.from_file(path)
    answers = (
        "你好👋！我是人工智能助手 ChatGLM2-6B。",
        "Hello! How can I help?",
        "  spaced \n",
        "",
        "1. 一\n2.",
    )
    for history in ((), (("hi", "hello"),)):
        for answer in answers:
            request = GenerationRequest(query="问题 one", history=history)
            kept = tokenizer.encode(next_turn_text(request, answer))
            for query in ("next", "你好", " space first", "：colon", "🙂"):
                following = tokenizer.build_chat_input(query, (*history, (request.query, answer)))
                assert common_prefix_length(kept, following) >= len(kept) - 1, (answer, query)


def test_finish_keeps_the_prompt_and_idle_steps_add_the_answer(
    pair: tuple[ChatGLM2Generator, ChatGLM2Generator],
) -> None:
    cached, plain = pair
    first = GenerationRequest(query=QUERIES[0], params=GREEDY, conversation="c4")
    state, answer = turn(cached, first, idle=False)
    kept = cached.prefix_cache.take("c4")
    assert kept is not None and kept.ids == tuple(state.prompt_ids)  # finish did not prefill the answer
    cached.prefix_cache.put("c4", kept)
    target = cached.tokenizer.encode(next_turn_text(first, answer))
    before = cached.idle_chunk_tokens
    cached.idle_chunk_tokens = 3
    try:
        start = common_prefix_length(state.prompt_ids, target)
        steps = 0
        while True:
            assert cached.pending_idle_work == 1  # counted until its last chunk is done
            more = cached.idle_step()  # one 3-token chunk per call
            steps += 1
            extended = cached.prefix_cache.take("c4")
            assert extended is not None and len(extended.ids) == min(len(target), start + 3 * steps)
            cached.prefix_cache.put("c4", extended)
            if not more:
                break
    finally:
        cached.idle_chunk_tokens = before
    assert steps >= 2 and cached.pending_idle_work == 0
    extended = cached.prefix_cache.take("c4")
    assert extended is not None and extended.ids == tuple(target) and extended.kv.shape[3] == len(target)
    cached.prefix_cache.put("c4", extended)
    request = GenerationRequest(
        query=QUERIES[2], history=((QUERIES[0], answer),), params=GREEDY, conversation="c4"
    )
    again, text = turn(cached, request)
    reference, reference_text = turn(plain, request)
    assert again.reused >= len(target) - 1
    assert again.tokens == reference.tokens and text == reference_text


def test_a_turn_before_the_idle_work_reuses_the_prompt_and_drops_it(
    pair: tuple[ChatGLM2Generator, ChatGLM2Generator],
) -> None:
    cached, plain = pair
    first = GenerationRequest(query=QUERIES[0], params=GREEDY, conversation="c5")
    state, answer = turn(cached, first, idle=False)
    request = GenerationRequest(
        query=QUERIES[2], history=((QUERIES[0], answer),), params=GREEDY, conversation="c5"
    )
    again = cached.begin(request, lambda _d: None, lambda: False)
    assert again.reused == len(state.prompt_ids)
    assert not cached.idle_step()  # the pending extension went with the kept KV
    while not again.done:
        cached.step([again])
    text = cached.finish(again).text
    reference, reference_text = turn(plain, request)
    assert again.tokens == reference.tokens and text == reference_text
    while cached.idle_step():
        pass


def test_idle_steps_wait_for_a_free_row(pair: tuple[ChatGLM2Generator, ChatGLM2Generator]) -> None:
    cached, _ = pair
    first = GenerationRequest(query=QUERIES[0], params=GREEDY, conversation="c6")
    turn(cached, first, idle=False)
    busy = [
        cached.begin(GenerationRequest(query=q, params=GREEDY), lambda _d: None, lambda: False)
        for q in QUERIES[:2]
    ]
    kept = cached.prefix_cache.take("c6")
    assert kept is not None
    cached.prefix_cache.put("c6", kept)
    assert not cached.idle_step()  # both rows are in use: nothing is done now
    assert cached.prefix_cache.take("c6") == kept
    cached.prefix_cache.put("c6", kept)
    for state in busy:
        cached.finish(state)
    while cached.idle_step():
        pass
    extended = cached.prefix_cache.take("c6")
    assert extended is not None and len(extended.ids) > len(kept.ids)


def test_a_failing_idle_chunk_keeps_the_kept_kv_and_drops_the_work(
    pair: tuple[ChatGLM2Generator, ChatGLM2Generator],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cached, _ = pair
    state, _ = turn(cached, GenerationRequest(query=QUERIES[1], params=GREEDY, conversation="c7"), idle=False)
    assert cached.pending_idle_work == 1

    def failing(row: int, ids: object, start: int) -> torch.Tensor:
        raise RuntimeError("no memory")

    monkeypatch.setattr(cached, "_prefill", failing)
    assert not cached.idle_step()
    assert cached.pending_idle_work == 0 and "extending a conversation's kept KV failed" in caplog.text
    kept = cached.prefix_cache.take("c7")
    assert kept is not None and kept.ids == tuple(state.prompt_ids)


def test_anonymous_entries_are_found_by_the_longest_token_prefix() -> None:
    cache = PrefixCache(1 << 20)
    short, long = CachedPrefix((1, 2), entry(2).kv), CachedPrefix((1, 2, 3, 4), entry(4).kv)
    cache.put("conversation", CachedPrefix((1, 2, 3, 4, 5), entry(5).kv))  # keyed: never matched
    short_key, long_key = cache.new_anonymous_key(), cache.new_anonymous_key()
    assert short_key != long_key and not short_key.startswith("conversation")
    cache.put(short_key, short)
    cache.put(long_key, long)
    assert cache.longest_match((1, 2, 3, 9)) == (long_key, long)
    assert cache.longest_match((1, 2, 7)) in ((short_key, short), (long_key, long))
    assert cache.longest_match((8,)) is None
    assert len(cache) == 3  # matching leaves the entries in place
    cache.discard(long_key, short)  # not the entry it holds: kept
    assert long_key in cache
    cache.discard(long_key, long)
    assert long_key not in cache and cache.longest_match((1, 2, 3)) == (short_key, short)


def test_a_request_without_a_key_reuses_the_prompt_it_extends(
    pair: tuple[ChatGLM2Generator, ChatGLM2Generator],
) -> None:
    """The stateless API's case: each request resends the whole conversation, without a key."""
    cached, plain = pair
    before = len(cached.prefix_cache)
    history: tuple[Turn, ...] = ()
    for number, query in enumerate(QUERIES[:3]):
        request = GenerationRequest(query=query, history=history, params=GREEDY)
        state, text = turn(cached, request)
        reference, reference_text = turn(plain, request)
        assert (state.tokens, text) == (reference.tokens, reference_text)
        if number:  # all but this turn's query (and the re-canonicalised answer's end)
            assert state.reused >= len(state.prompt_ids) - cached.count_tokens(query) - 6
        history = (*history, (query, text))
    assert len(cached.prefix_cache) == before + 1  # each turn superseded the entry it extended
    # Another conversation sharing only the prompt header reuses that much and leaves the entry.
    state, _ = turn(cached, GenerationRequest(query=QUERIES[3], params=GREEDY))
    header = len(state.prompt_ids) - cached.count_tokens(QUERIES[3])
    assert 0 < state.reused < header and len(cached.prefix_cache) == before + 2
    for key in [key for key in list(cached.prefix_cache._entries) if key.startswith("\x00")]:
        cached.prefix_cache.take(key)
