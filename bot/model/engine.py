"""``ChatGLM2Generator``: the bot's ``BatchGenerator`` over the native engine (official chat prompt,
sampling defaults, ``process_response``), with batched decoding and prefix KV reuse.

Batching: each request owns one row of the model's KV cache (``max_batch_size`` rows). ``begin``
takes a free row for a request; ``step`` samples every running row with its own parameters and then
runs ONE forward over rows ``0 .. top`` at each row's own position; ``finish`` frees the row. A row
that is not advancing in a step (free, prefilling or already done) gets a dummy token written at its
next free slot, which is never read and is overwritten by that row's next real token, so it needs no
masking.

Prefill is chunked: each ``step`` (``begin`` too) prefills at most ``prefill_chunk_tokens`` of the
oldest request still prefilling, after the decode forward. A long prompt so pauses the other streams
for one chunk at a time instead of its whole prefill, and activation memory is bounded by the chunk.
Each chunk reads the weights once more, which is small next to its compute.

Prefix reuse: when a turn of a conversation ends, its row's KV is copied into a ``PrefixCache`` keyed
by ``GenerationRequest.conversation``. The next turn copies back the longest common prefix of the
cached ids and its prompt ids (KV at position t depends only on ids 0..t) and prefills only the rest;
a trimmed or edited history simply shares less (often only ``[gMASK] sop [Round 1]``). A request
without a conversation key (the stateless API) reuses the anonymous entry with the longest common
token prefix, leaving it for others, and its own KV is kept under a new anonymous key; the entry it
fully extended is dropped then, so a conversation resent turn after turn keeps one entry. Only KV that a
prefill computed is kept, never a decode step's (``decode_attention`` is a different routine).
In float32 the result equals a full re-prefill up to reduction order (greedy ids equal in the tests);
in bfloat16 the attention of a split prefill can differ from a full one in the last bit, as with any
prefix cache, which may flip a near-tie. Re-encoding the answer text rarely gives back the sampled
ids anyway (the official fine-tuning encodes the answer apart, so its first token carries a "▁" that
the joined next prompt does not). So ``finish`` keeps the prompt's KV and notes the canonical ids of
"answer + next round header" (at most ``FIXUP_MAX_TOKENS`` more); ``idle_step``, which the model
service calls only while no request is running or waiting, prefills them a chunk at a time. The
answer's end, its final edit and its storage never wait for that, and the next turn, when the user
takes a moment to write it, prefills only its own query. A turn that comes first takes the kept KV as
it is and prefills the rest itself.

Streaming and ``process_response`` (strip + placeholder fill): deltas are released only where the
final text cannot change them. Leading whitespace is dropped, trailing whitespace and a trailing
partial ``[[训练时间]]`` are held back until later text follows (or dropped at the end), so the deltas
always concatenate to exactly the returned ``process_response(decode(ids))``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bot.generation import DecodeState, GenerationRequest, GenerationResult, Turn
from bot.model.config import ChatGLM2Config
from bot.model.kv_cache import read_kv, write_kv
from bot.model.loader import load_model
from bot.model.model import ChatGLM2
from bot.model.prefix_cache import CachedPrefix, PrefixCache, common_prefix_length
from bot.model.quant import int4_backends
from bot.model.sampling import MAX_LENGTH, GenerationOutput, SamplingParams, next_token
from bot.model.tokenizer import ChatGLMTokenizer, StreamDecoder, process_response

log = logging.getLogger(__name__)

_PLACEHOLDER = "[[训练时间]]"
_MB = 1 << 20
FIXUP_MAX_TOKENS = 256
_MAX_PENDING_EXTENSIONS = 64  # conversations whose kept KV waits for idle time (most recent kept)
PREFILL_CHUNK_TOKENS = 64
# Idle work's chunk: small, since a request arriving during one waits for it; reading the weights once
# more per chunk costs only idle time.
IDLE_CHUNK_TOKENS = 16


class ResponseStreamer:
    """Turns raw decoded deltas into deltas of ``process_response(raw text)``."""

    def __init__(self) -> None:
        self._raw: list[str] = []
        self._sent = 0

    def push(self, delta: str) -> str:
        self._raw.append(delta)
        raw = "".join(self._raw)
        hold = _partial_placeholder(raw)
        return self._release(process_response(raw[: len(raw) - hold]))

    def finish(self) -> str:
        return self._release(self.text)

    @property
    def text(self) -> str:
        return process_response("".join(self._raw))

    def _release(self, stable: str) -> str:
        # process_response of a prefix that ends neither in whitespace nor inside the placeholder is a
        # prefix of the final text; a stripped trailing run simply is not released yet.
        delta = stable[self._sent :]
        self._sent = max(self._sent, len(stable))
        return delta


def _partial_placeholder(text: str) -> int:
    """Length of the longest proper prefix of the placeholder that ``text`` ends with."""
    for size in range(min(len(_PLACEHOLDER) - 1, len(text)), 0, -1):
        if text.endswith(_PLACEHOLDER[:size]):
            return size
    return 0


@dataclass(frozen=True, slots=True)
class ChatRun:
    prompt_ids: list[int]
    output: GenerationOutput
    text: str


@dataclass(eq=False)
class ChatState:
    """One request in the batch (a ``DecodeState``)."""

    request: GenerationRequest
    on_text: Callable[[str], None]
    should_stop: Callable[[], bool]
    row: int
    prompt_ids: list[int]
    ids: list[int]  # the ids whose KV is in the row: slot i holds ids[i]
    budget: int  # most new tokens (max_new_tokens, capped by the context limit)
    sampling: SamplingParams
    rng: torch.Generator | None
    reused: int  # prompt tokens whose KV came from the prefix cache
    decoder: StreamDecoder
    source: tuple[str, CachedPrefix] | None = None  # the anonymous entry this prompt fully extends
    prefilled: int = 0  # prompt slots whose KV is in the row (reused ones included)
    logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # raw [V] for the next token
    first_logits: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # float32, of the prefill
    prefill_s: float = 0.0
    error: Exception | None = None  # a prefill chunk failed: finish() raises it
    streamer: ResponseStreamer = field(default_factory=ResponseStreamer)
    tokens: list[int] = field(default_factory=list)  # sampled ids, a final eos included
    decode_s: float = 0.0
    stopped: bool = False  # should_stop() ended it
    done: bool = False  # eos, a token limit or should_stop(): finish() may be called
    released: bool = False  # finish() freed the row

    @property
    def prefilling(self) -> bool:
        return not self.done and self.prefilled < len(self.prompt_ids)


class ChatGLM2Generator:
    def __init__(
        self,
        model: ChatGLM2,
        tokenizer: ChatGLMTokenizer,
        config: ChatGLM2Config,
        *,
        max_batch_size: int = 8,
        prefix_cache_mb: int = 1024,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.idle_chunk_tokens = IDLE_CHUNK_TOKENS
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.load_s = 0.0
        self.prefix_cache = PrefixCache(prefix_cache_mb * _MB)
        self._max_batch_size = max_batch_size
        self._rows: dict[int, ChatState] = {}  # row -> the state that owns it
        # conversation -> the ids its kept KV should grow to ("answer + next round header")
        self._extensions: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()  # generate is single-threaded by contract; this makes misuse safe
        model.setup_caches(max_batch_size, self.max_context_tokens)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: str = "auto",
        device: str = "auto",
        num_threads: int = 0,
        max_batch_size: int = 8,
        prefix_cache_mb: int = 1024,
        **load_kwargs: Any,
    ) -> ChatGLM2Generator:
        """Load a checkpoint; ``load_kwargs`` go to ``load_model``."""
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        started = time.perf_counter()
        model, tokenizer, config = load_model(path, dtype=dtype, device=device, **load_kwargs)
        generator = cls(
            model, tokenizer, config, max_batch_size=max_batch_size, prefix_cache_mb=prefix_cache_mb
        )
        generator.load_s = time.perf_counter() - started
        return generator

    @property
    def max_context_tokens(self) -> int:
        return min(self.config.seq_length, MAX_LENGTH)

    def describe(self) -> dict[str, str]:
        """What is loaded, for the ``chatglm_bot_model_info`` metric."""
        dtype = self.model.transformer.output_layer.weight.dtype
        backends = int4_backends(self.model)
        return {
            "dtype": str(dtype).removeprefix("torch."),
            "device": self.model.device.type,
            "kernel": ",".join(backends) if backends else "dense",
        }

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def in_use_rows(self) -> int:
        """Cache rows held by begun, not yet finished requests."""
        return len(self._rows)

    @property
    def pending_idle_work(self) -> int:
        """Conversations whose kept KV ``idle_step`` has yet to extend."""
        return len(self._extensions)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_tokens(self, query: str, history: Sequence[Turn]) -> int:
        return len(self.tokenizer.build_chat_input(query, history))

    # -- BatchGenerator ------------------------------------------------------------------------
    def begin(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> ChatState:
        """Take a free cache row for ``request``, reuse its conversation's kept KV and prefill the first
        chunk of the rest (``step`` prefills the others)."""
        params = request.params
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        sampling = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        prompt = self.tokenizer.build_chat_input(request.query, request.history)
        limit = self.max_context_tokens
        if len(prompt) >= limit:
            raise ValueError(f"prompt is {len(prompt)} tokens; the model accepts {limit} in total")
        free = [row for row in range(self._max_batch_size) if row not in self._rows]
        if not free:
            raise RuntimeError(f"all {self._max_batch_size} batch rows are in use")
        row = free[0]  # the lowest free row keeps the decode forward's rows 0..top compact
        rng = None
        if params.seed is not None:
            rng = torch.Generator(device=self.model.device).manual_seed(params.seed)
        cached = None
        source = None
        if request.conversation:
            cached = self.prefix_cache.take(request.conversation)
            self._extensions.pop(request.conversation, None)
        else:
            match = self.prefix_cache.longest_match(prompt)
            if match is not None:
                cached = match[1]
                if common_prefix_length(cached.ids, prompt) == len(cached.ids):
                    source = match
        started = time.perf_counter()
        reused = 0
        if cached is not None:
            # At least one prompt token is prefilled: its logits give the first new token.
            reused = min(common_prefix_length(cached.ids, prompt), len(prompt) - 1)
        state = ChatState(
            request=request,
            on_text=on_text,
            should_stop=should_stop,
            row=row,
            prompt_ids=prompt,
            ids=list(prompt),
            budget=min(params.max_new_tokens, limit - len(prompt)),
            sampling=sampling,
            rng=rng,
            reused=reused,
            decoder=self.tokenizer.stream_decoder(),
            source=source,
            prefilled=reused,
        )
        try:
            if cached is not None and reused:
                write_kv(self.model.caches(), row, cached.kv[:, :, :, :reused])
            state.prefill_s = time.perf_counter() - started
            self._prefill_next(state)
        except BaseException:
            if cached is not None and request.conversation:  # an anonymous entry was never taken
                self.prefix_cache.put(request.conversation, cached)
            raise
        self._rows[row] = state
        return state

    def step(self, states: Sequence[DecodeState]) -> None:
        """Sample one token for every prefilled running state, one forward for those that go on, then
        one prefill chunk of the first state still prefilling."""
        owned = [self._own(state) for state in states]
        started = time.perf_counter()
        ready = [state for state in owned if not state.done and not state.prefilling]
        advancing = [state for state in ready if self._sample(state)]
        if advancing:
            top = max(state.row for state in advancing) + 1
            ids = torch.zeros((top, 1), dtype=torch.long)
            positions = torch.zeros((top, 1), dtype=torch.long)
            for row in range(top):
                occupant = self._rows.get(row)
                if occupant is not None:  # its next free slot: written with a dummy unless it advances
                    positions[row, 0] = len(occupant.ids)
            for state in advancing:
                ids[state.row, 0] = state.tokens[-1]
            device = self.model.device
            with torch.inference_mode():
                logits = self.model(ids.to(device), positions.to(device), last_only=True)
            for state in advancing:
                state.logits = logits[state.row, -1]
                state.ids.append(state.tokens[-1])
        elapsed = time.perf_counter() - started
        for state in advancing:
            state.decode_s += elapsed
        pending = next((state for state in owned if state.prefilling), None)
        if pending is not None:
            self._prefill_chunk(pending)

    def finish(self, state: DecodeState) -> GenerationResult:
        """Flush the text, keep the conversation's KV, free the row; raises a prefill's error."""
        own = self._own(state)
        try:
            tail = own.streamer.push(own.decoder.flush()) + own.streamer.finish()
            if tail:
                own.on_text(tail)
            if self.prefix_cache.max_bytes > 0:
                self._keep_prefix(own)
        finally:
            own.released = True
            del self._rows[own.row]
        if own.error is not None:
            raise own.error
        tokens = own.tokens
        eos = 1 if tokens and tokens[-1] == self.tokenizer.eos_id else 0
        return GenerationResult(
            text=own.streamer.text,
            prompt_tokens=len(own.prompt_ids),
            new_tokens=len(tokens) - eos,
            stopped=own.stopped,
            hit_limit=not (eos or own.stopped) and len(tokens) >= own.budget,
            reused_tokens=own.reused,
        )

    def idle_step(self) -> bool:
        """Prefill one chunk (``idle_chunk_tokens``) of the most recently noted "answer + next round
        header" into its conversation's kept KV, in a free row; True while such work remains. For
        idle moments only: a request arriving meanwhile waits for the chunk, so chunks are small.
        The conversation counts in ``pending_idle_work`` until its last chunk is done."""
        free = next((row for row in range(self._max_batch_size) if row not in self._rows), None)
        if free is None:
            return False
        while self._extensions:
            conversation, target = next(reversed(self._extensions.items()))
            entry = self.prefix_cache.take(conversation)
            if entry is None:  # evicted meanwhile
                del self._extensions[conversation]
                continue
            start = common_prefix_length(entry.ids, target)  # re-encoding may change the last id
            end = min(len(target), start + self.idle_chunk_tokens)
            finished = True  # nothing to add, the last chunk, or a failure: the work is over
            try:
                if 0 < start < end:
                    write_kv(self.model.caches(), free, entry.kv[:, :, :, :start])
                    self._prefill(free, target[:end], start)
                    entry = CachedPrefix(target[:end], read_kv(self.model.caches(), free, end))
                    finished = end == len(target)
            except Exception:
                log.exception("extending a conversation's kept KV failed")
            finally:
                self.prefix_cache.put(conversation, entry)
            if finished:
                del self._extensions[conversation]
            return bool(self._extensions)
        return False

    # -- one request at a time -----------------------------------------------------------------
    def run(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> ChatRun:
        """Generate the answer alone; ``on_text`` gets deltas of the final (processed) text."""
        state, result = self._run_alone(request, on_text, should_stop)
        output = GenerationOutput(
            state.tokens, state.stopped, state.first_logits, state.prefill_s, state.decode_s
        )
        return ChatRun(state.prompt_ids, output, result.text)

    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        return self._run_alone(request, on_text, should_stop)[1]

    # -- internals -----------------------------------------------------------------------------
    def _run_alone(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> tuple[ChatState, GenerationResult]:
        with self._lock:
            state = self.begin(request, on_text, should_stop)
            try:
                while not state.done:
                    self.step([state])
            except BaseException:
                self.finish(state)
                raise
            return state, self.finish(state)

    def _own(self, state: DecodeState) -> ChatState:
        if not isinstance(state, ChatState) or state.released or self._rows.get(state.row) is not state:
            raise ValueError("not a running state of this generator")
        return state

    def _prefill_chunk(self, state: ChatState) -> None:
        """The next chunk of ``state``'s prompt; a failure ends that state only."""
        if state.should_stop():
            state.stopped = state.done = True
            return
        try:
            self._prefill_next(state)
        except Exception as exc:  # finish() raises it, for the caller to report
            state.error, state.done = exc, True

    def _prefill_next(self, state: ChatState) -> None:
        """Prefill up to ``prefill_chunk_tokens`` more of ``state``'s prompt; the last chunk's logits
        give the first new token."""
        started = time.perf_counter()
        end = min(len(state.prompt_ids), state.prefilled + self.prefill_chunk_tokens)
        logits = self._prefill(state.row, state.prompt_ids[:end], state.prefilled)
        state.prefilled = end
        state.prefill_s += time.perf_counter() - started
        if end == len(state.prompt_ids):
            state.logits = logits
            state.first_logits = logits.float().cpu()

    def _prefill(self, row: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Run ``ids[start:]`` at positions ``start..`` in ``row`` -> raw logits [V] of the last one."""
        device = self.model.device
        with torch.inference_mode():
            tokens = torch.tensor(list(ids[start:]), device=device)[None]
            positions = torch.arange(start, len(ids), device=device)
            logits: torch.Tensor = self.model(tokens, positions, last_only=True, first_row=row)
        return logits[0, -1]

    def _sample(self, state: ChatState) -> bool:
        """Sample and stream ``state``'s next token; True when it needs a forward to go on."""
        if state.should_stop():
            state.stopped = state.done = True
            return False
        token = next_token(state.logits, self.tokenizer.vocab_size, state.sampling, state.rng)
        state.tokens.append(token)
        if token == self.tokenizer.eos_id:
            state.done = True
            return False
        delta = state.streamer.push(state.decoder.push(token))
        if delta:
            state.on_text(delta)
        if len(state.tokens) >= state.budget:
            state.done = True
            return False
        return True

    def _keep_prefix(self, state: ChatState) -> None:
        """Store the row's KV for the conversation's next turn and note what ``idle_step`` should add
        to it (an optimisation: failures are logged)."""
        ids = state.prompt_ids[: state.prefilled]  # prefill-computed KV only
        conversation = state.request.conversation or self.prefix_cache.new_anonymous_key()
        try:
            kv = read_kv(self.model.caches(), state.row, len(ids))
            self.prefix_cache.put(conversation, CachedPrefix(tuple(ids), kv))
            if state.source is not None:  # superseded: every prompt it served shares as much with ids
                source_key, source_entry = state.source
                self.prefix_cache.discard(source_key, source_entry)
                if source_key not in self.prefix_cache:
                    self._extensions.pop(source_key, None)
            if state.stopped or state.error is not None or len(ids) < len(state.prompt_ids):
                return
            target = self.tokenizer.encode(next_turn_text(state.request, state.streamer.text))
            start = common_prefix_length(ids, target)
            if start < len(target) < self.max_context_tokens and len(target) - start <= FIXUP_MAX_TOKENS:
                self._extensions[conversation] = tuple(target)
                while len(self._extensions) > _MAX_PENDING_EXTENSIONS:
                    self._extensions.popitem(last=False)
        except Exception:
            log.exception("keeping the conversation's KV cache failed")


def next_turn_text(request: GenerationRequest, answer: str) -> str:
    """The text every next prompt of this conversation starts with: this turn's prompt, the answer
    and the next round's header up to its (unknown) query."""
    prompt = ChatGLMTokenizer.build_prompt("", (*request.history, (request.query, answer)))
    return prompt.removesuffix("\n\n答：")
