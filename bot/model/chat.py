"""``ChatGLM2Generator``: the bot's ``Generator`` over the native engine (official chat prompt,
sampling defaults, ``process_response``).

Streaming and ``process_response`` (strip + placeholder fill): deltas are released only where the
final text cannot change them. Leading whitespace is dropped, trailing whitespace and a trailing
partial ``[[训练时间]]`` are held back until later text follows (or dropped at the end), so the deltas
always concatenate to exactly the returned ``process_response(decode(ids))``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bot.generation import GenerationRequest, GenerationResult, Turn
from bot.model.config import ChatGLM2Config
from bot.model.generate import MAX_LENGTH, GenerationOutput, SamplingParams, generate
from bot.model.loader import load_model
from bot.model.model import ChatGLM2
from bot.model.tokenizer import ChatGLMTokenizer, process_response

_PLACEHOLDER = "[[训练时间]]"


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


class ChatGLM2Generator:
    def __init__(self, model: ChatGLM2, tokenizer: ChatGLMTokenizer, config: ChatGLM2Config) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.load_s = 0.0
        self._lock = threading.Lock()  # generate is single-threaded by contract; this makes misuse safe

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: str = "auto",
        device: str = "auto",
        num_threads: int = 0,
    ) -> ChatGLM2Generator:
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        started = time.perf_counter()
        generator = cls(*load_model(path, dtype=dtype, device=device))
        generator.load_s = time.perf_counter() - started
        return generator

    @property
    def max_context_tokens(self) -> int:
        return min(self.config.seq_length, MAX_LENGTH)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_tokens(self, query: str, history: Sequence[Turn]) -> int:
        return len(self.tokenizer.build_chat_input(query, history))

    def run(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> ChatRun:
        """Generate the answer; ``on_text`` gets deltas of the final (processed) text."""
        params = request.params
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        prompt = self.tokenizer.build_chat_input(request.query, request.history)
        if len(prompt) >= self.max_context_tokens:
            raise ValueError(
                f"prompt is {len(prompt)} tokens; the model accepts {self.max_context_tokens} in total"
            )
        rng = None
        if params.seed is not None:
            rng = torch.Generator(device=self.model.device).manual_seed(params.seed)
        decoder = self.tokenizer.stream_decoder()
        streamer = ResponseStreamer()

        def on_token(token: int) -> None:
            if token == self.tokenizer.eos_id:
                return
            delta = streamer.push(decoder.push(token))
            if delta:
                on_text(delta)

        sampling = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        with self._lock:
            output = generate(
                self.model,
                prompt,
                max_new_tokens=params.max_new_tokens,
                eos_id=self.tokenizer.eos_id,
                vocab_size=self.tokenizer.vocab_size,
                params=sampling,
                generator=rng,
                on_token=on_token,
                should_stop=should_stop,
                max_length=self.max_context_tokens,
            )
        streamer.push(decoder.flush())
        tail = streamer.finish()
        if tail:
            on_text(tail)
        return ChatRun(prompt, output, streamer.text)

    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        result = self.run(request, on_text, should_stop)
        tokens = result.output.tokens
        new_tokens = len(tokens) - (1 if tokens and tokens[-1] == self.tokenizer.eos_id else 0)
        return GenerationResult(
            text=result.text,
            prompt_tokens=len(result.prompt_ids),
            new_tokens=new_tokens,
            stopped=result.output.stopped,
        )
