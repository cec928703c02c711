"""ChatGLM2 tokenizer: SentencePiece plus the five GLM special tokens, with streaming decode.

Behaviour follows the official ``tokenization_chatglm.py`` of ChatGLM2-6B (checked against the
golden fixture in ``tests/fixtures/chatglm2``):

* the special tokens ``[MASK] [gMASK] [sMASK] sop eop`` get the ids right after the
  SentencePiece pieces (64789..64793 for the real model);
* ``encode`` prefixes ``[gMASK] sop``;
* ``decode`` turns every special id and ``<unk>``/``<s>``/``</s>`` into an empty piece and lets
  SentencePiece decode the pieces (byte-fallback runs are joined; incomplete or invalid UTF-8
  becomes one U+FFFD per byte; the dummy-prefix space of the first visible piece is dropped).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
TOKENIZER_FILE = "tokenizer.model"
_SPACE = "▁"  # SentencePiece's whitespace symbol
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

Turn = tuple[str, str]


class ChatGLMTokenizer:
    """Load with :meth:`from_file` (a ``tokenizer.model`` file or a checkpoint folder holding one)."""

    def __init__(self, sp: spm.SentencePieceProcessor) -> None:
        self._sp = sp
        n_pieces = int(sp.get_piece_size())
        self._n_pieces = n_pieces
        self._special = {token: n_pieces + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._bos_id = int(sp.bos_id())
        self._eos_id = int(sp.eos_id())
        self._pad_id = int(sp.unk_id())  # the official tokenizer pads with <unk>'s id (0)
        # Official convert_id_to_token: specials, <unk>, <s> and </s> decode to an empty piece.
        hidden = {self._bos_id, self._eos_id, self._pad_id}
        self._pieces: list[str] = ["" if i in hidden else str(sp.id_to_piece(i)) for i in range(n_pieces)] + [
            ""
        ] * len(SPECIAL_TOKENS)
        self._byte_values: dict[int, int] = {
            i: int(self._pieces[i][3:5], 16) for i in range(n_pieces) if sp.is_byte(i)
        }
        space_id = int(sp.piece_to_id(_SPACE))
        if space_id == sp.unk_id():
            raise ValueError("not a ChatGLM tokenizer: the SentencePiece model has no '▁' piece")
        self._anchor = self._find_anchor()

    @classmethod
    def from_file(cls, path: str | Path) -> ChatGLMTokenizer:
        """Load ``path``: a ``tokenizer.model`` file, or a checkpoint folder that contains one."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"not a SentencePiece model: {path}: {exc}") from exc
        return cls(sp)

    # -- sizes and ids -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids including the special tokens (64794 for the real model)."""
        return self._n_pieces + len(SPECIAL_TOKENS)

    @property
    def sp_vocab_size(self) -> int:
        return self._n_pieces

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def gmask_id(self) -> int:
        return self._special["[gMASK]"]

    @property
    def sop_id(self) -> int:
        return self._special["sop"]

    @property
    def special_ids(self) -> dict[str, int]:
        """``[MASK] [gMASK] [sMASK] sop eop`` -> id."""
        return dict(self._special)

    def id_to_piece(self, token_id: int) -> str:
        """The piece for ``token_id``; empty for specials, ``<unk>``, ``<s>``, ``</s>``, out of range."""
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else ""

    def is_byte(self, token_id: int) -> bool:
        """Whether ``token_id`` is a byte-fallback piece ``<0xNN>``."""
        return token_id in self._byte_values

    # -- text -> ids ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        return [str(p) for p in self._sp.encode_as_pieces(_clean(text))]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [int(i) for i in self._sp.encode_as_ids(_clean(text))]
        return [self.gmask_id, self.sop_id, *ids] if add_special_tokens else ids

    @staticmethod
    def build_prompt(query: str, history: Sequence[Turn] = ()) -> str:
        """The official ChatGLM2 chat prompt."""
        parts = [
            f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
            for i, (old_query, response) in enumerate(history)
        ]
        parts.append(f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")
        return "".join(parts)

    def build_chat_input(self, query: str, history: Sequence[Turn] = ()) -> list[int]:
        return self.encode(self.build_prompt(query, history))

    def pad_batch(
        self, batch: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Left-pad like the official tokenizer: ``(input_ids, attention_mask, position_ids)``,
        padding with ``pad_id`` / 0 / 0."""
        width = max((len(ids) for ids in batch), default=0)
        input_ids, attention_mask, position_ids = [], [], []
        for ids in batch:
            pad = width - len(ids)
            input_ids.append([self._pad_id] * pad + list(ids))
            attention_mask.append([0] * pad + [1] * len(ids))
            position_ids.append([0] * pad + list(range(len(ids))))
        return input_ids, attention_mask, position_ids

    # -- ids -> text ---------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode_pieces([self.id_to_piece(i) for i in ids])

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def _decode_pieces(self, pieces: list[str]) -> str:
        return str(self._sp.decode_pieces(pieces)) if pieces else ""

    def _find_anchor(self) -> str:
        """A plain piece without '▁' that decodes to itself. Decoding it in front of a chunk
        of pieces reproduces how that chunk decodes after earlier visible text (no dummy-prefix
        space dropped), which lets StreamDecoder decode only its window."""
        sp = self._sp
        for i in range(self._n_pieces):
            piece = self._pieces[i]
            if (
                piece
                and _SPACE not in piece
                and not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
                and self._decode_pieces([piece]) == piece
            ):
                return piece
        raise ValueError("not a ChatGLM tokenizer: no plain piece found")


class StreamDecoder:
    """Incremental detokenizer: the deltas from :meth:`push` plus :meth:`flush` concatenate to
    ``tokenizer.decode(all_ids)``.

    Text is released only at points where later ids cannot change it: after a non-byte piece,
    or after a byte piece that completes a UTF-8 sequence. An incomplete byte-fallback sequence
    is held back (the official ``stream_chat`` holds back a trailing U+FFFD for the same reason).
    Each release decodes only the pieces pushed since the previous one, so the cost is linear.
    """

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self._tok = tokenizer
        self._reset()

    def _reset(self) -> None:
        self._window: list[str] = []  # pieces not yet released
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._at_start = True  # the dummy-prefix space of the first visible piece is still to drop
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._text)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often empty while bytes are pending)."""
        tok, token_id = self._tok, int(token_id)
        self._window.append(tok.id_to_piece(token_id))
        byte = tok._byte_values.get(token_id)
        if byte is None:
            self._utf8.reset()
        else:
            self._utf8.decode(bytes((byte,)))
            if self._utf8.getstate()[0]:
                return ""  # inside a multi-byte character
        return self._release()

    def flush(self) -> str:
        """Release what is left (an unfinished byte sequence as U+FFFD, like ``decode``) and
        start a new stream."""
        delta = self._release()
        self._reset()
        return delta

    def _release(self) -> str:
        tok, window = self._tok, self._window
        if not window:
            return ""
        if self._at_start:
            delta = tok._decode_pieces(window)
            # Still at the start while every piece so far was invisible: a following '▁' would
            # then decode to nothing.
            self._at_start = tok._decode_pieces([*window, _SPACE]) == delta
        else:
            anchor = tok._anchor
            delta = tok._decode_pieces([anchor, *window])[len(anchor) :]
        self._window = []
        if delta:
            self._text.append(delta)
        return delta


def process_response(text: str) -> str:
    """Official ChatGLM2 ``process_response``: strip, and fill in the training-time placeholder.
    (The punctuation rewriting some copies carry is ChatGLM-6B v1's, not ChatGLM2's.)"""
    return text.strip().replace("[[训练时间]]", "2023年")


def _clean(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    # Lone surrogates (possible from JSON escapes) cannot be encoded as UTF-8.
    return _LONE_SURROGATE.sub("\ufffd", text)
