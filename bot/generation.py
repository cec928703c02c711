"""What the model service asks of a model: the ``Generator`` protocol and its request types.

A ``Generator`` is driven only from the service's single inference thread; ``count_tokens``
and ``prompt_tokens`` may also be called from the event loop and must be thread-safe and cheap
(tokenizer work only, no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Turn = tuple[str, str]  # (user query, assistant response)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.8
    top_k: int = 50
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One answer to produce. ``conversation`` is an opaque key (a prefix cache may use it)."""

    query: str
    history: tuple[Turn, ...] = ()
    params: GenerationParams = field(default_factory=GenerationParams)
    conversation: str = ""


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    stopped: bool = False  # should_stop() ended it early
    hit_limit: bool = False  # ended at max_new_tokens or the context limit, not at eos
    reused_tokens: int = 0  # prompt tokens whose KV a prefix cache supplied


class Generator(Protocol):
    """A loaded model. ``generate`` runs on the inference thread only."""

    @property
    def max_context_tokens(self) -> int:
        """The most tokens (prompt + answer) the model accepts."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def prompt_tokens(self, query: str, history: Sequence[Turn]) -> int:
        """Length in tokens of the full chat prompt for ``query`` after ``history``."""
        ...

    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        """Produce the answer, calling ``on_text`` with each new piece of text (a delta that never
        ends inside a UTF-8 sequence) and checking ``should_stop`` before every token."""
        ...


GeneratorFactory = Callable[[], Generator]


@runtime_checkable
class IdleWork(Protocol):
    """A generator with deferrable work (e.g. preparing a conversation's next turn). The service calls
    ``idle_step`` on the inference thread only while no request is running or queued, again while it
    returns True, and stops as soon as a request arrives."""

    def idle_step(self) -> bool:
        """Do one short unit of the work; True while more remains."""
        ...


class DecodeState(Protocol):
    """One request inside a ``BatchGenerator``: prefilled, then advanced a token per step."""

    @property
    def done(self) -> bool:
        """Finished (eos, token limit, context limit or ``should_stop``); ``finish`` may be called."""
        ...


@runtime_checkable
class BatchGenerator(Generator, Protocol):
    """A Generator that can decode several requests together, one forward per step.

    The service admits requests at step boundaries (``begin`` prefills one), calls ``step`` with
    every unfinished state, and ``finish`` for each state that is done or abandoned (it frees the
    state's cache slot). All three run on the inference thread only.
    """

    @property
    def max_batch_size(self) -> int: ...

    def begin(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> DecodeState: ...

    def step(self, states: Sequence[DecodeState]) -> None: ...

    def finish(self, state: DecodeState) -> GenerationResult: ...
