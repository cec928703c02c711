"""ChatGLMTokenizer / StreamDecoder against the official tokenizer's outputs in the golden fixture."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from bot.model.tokenizer import ChatGLMTokenizer, StreamDecoder, process_response
from tests.model.fixture import expected, expected_real_tokenizer, real_tokenizer_path, tiny_dir

KINDS = ["tiny", "real"]


@pytest.fixture(scope="module")
def tiny() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_file(tiny_dir("fp32") / "tokenizer.model")


@pytest.fixture(scope="module")
def real() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_file(real_tokenizer_path())


def _load(kind: str, request: pytest.FixtureRequest) -> tuple[ChatGLMTokenizer, dict[str, Any]]:
    tok: ChatGLMTokenizer = request.getfixturevalue(kind)
    exp = expected()["tokenizer"] if kind == "tiny" else expected_real_tokenizer()
    return tok, exp


def _case_ids(n: int) -> list[int]:
    return list(range(n))


N_TRICKY = len(expected()["tokenizer"]["tricky"])


# -- parity with the official tokenizer ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", _case_ids(N_TRICKY))
def test_tricky_strings_match_official(kind: str, case: int, request: pytest.FixtureRequest) -> None:
    tok, exp = _load(kind, request)
    c = exp["tricky"][case]
    text = c["text"]
    assert tok.tokenize(text) == c["tokenize"]
    assert tok.encode(text) == c["encode"]
    assert tok.encode(text, add_special_tokens=False) == c["encode_no_special"] == c["sp_encode"]
    assert tok.decode(tok.encode(text)) == c["decode_encode"] == c["decode_skip_special"]
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == c["decode_encode_no_special"]
    assert (tok.decode(tok.encode(text)) == text) is c["roundtrip_exact"]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_prompts_match_official(kind: str, request: pytest.FixtureRequest) -> None:
    tok, exp = _load(kind, request)
    assert len(exp["chat_prompts"]) == 3
    for c in exp["chat_prompts"]:
        history = [(q, r) for q, r in c["history"]]
        assert tok.build_prompt(c["query"], history) == c["prompt"]
        ids = tok.build_chat_input(c["query"], history)
        assert ids == c["input_ids"]
        assert tok.pad_batch([ids]) == ([c["input_ids"]], [c["attention_mask"]], [c["position_ids"]])


@pytest.mark.parametrize("kind", KINDS)
def test_misc_ids_sizes_and_decodes(kind: str, request: pytest.FixtureRequest) -> None:
    tok, exp = _load(kind, request)
    m = exp["misc"]
    specials = m["special_ids"]
    assert tok.special_ids == {k: specials[k] for k in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")}
    assert (tok.gmask_id, tok.sop_id) == (specials["[gMASK]"], specials["sop"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (specials["<bos>"], specials["<eos>"], specials["<pad>"])
    assert (tok.eos_id, tok.pad_id) == (m["eos_token_id"], m["pad_token_id"]) == (2, 0)
    assert tok.sp_vocab_size == m["sp_vocab_size"]
    assert tok.vocab_size == m["n_words(tokenizer.vocab_size)"] == m["len(tokenizer)"]
    assert tok.decode([*tok.special_ids.values(), 0, 1, 2]) == m["decode_specials_only"] == ""
    assert [tok.id_to_piece(i) for i in range(6)] == m["convert_ids_to_tokens_0_5"]
    emoji = m["emoji_ids"]
    assert [tok.decode(emoji[:n]) for n in range(1, len(emoji) + 1)] == m["emoji_partial_decodes"]
    pad = m["batch_left_padding"]
    unpadded = [
        [t for t, keep in zip(row, mask, strict=True) if keep]
        for row, mask in zip(pad["input_ids"], pad["attention_mask"], strict=True)
    ]
    assert tok.pad_batch(unpadded) == (pad["input_ids"], pad["attention_mask"], pad["position_ids"])


def test_real_tokenizer_selected_pieces(real: ChatGLMTokenizer) -> None:
    exp = expected_real_tokenizer()
    hidden = {"<unk>", "<s>", "</s>"}  # shown as "" by the official convert_id_to_token
    for token_id, piece in exp["selected_pieces"].items():
        assert real.id_to_piece(int(token_id)) == ("" if piece in hidden else piece)
    assert real.tokenize("\n") == ["▁", "<0x0A>"]


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_chat_response_is_decode_plus_process_response(kind: str, tiny: ChatGLMTokenizer) -> None:
    runs = expected()[kind]
    assert len(runs) == 3
    for run in runs:
        assert process_response(tiny.decode(run["greedy_generate_ids"])) == run["chat_response_greedy_8"]


# -- API details -----------------------------------------------------------------------------------


def test_from_file_accepts_checkpoint_folder(tiny: ChatGLMTokenizer) -> None:
    from_dir = ChatGLMTokenizer.from_file(tiny_dir("int4"))
    assert from_dir.encode("你好 world") == tiny.encode("你好 world")
    assert from_dir.vocab_size == 605


def test_from_file_errors(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        ChatGLMTokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError):
        ChatGLMTokenizer.from_file(tmp_path)  # folder without tokenizer.model
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        ChatGLMTokenizer.from_file(bad)


def test_bad_text_input(tiny: ChatGLMTokenizer) -> None:
    with pytest.raises(TypeError):
        tiny.encode(b"bytes")  # type: ignore[arg-type]
    # A lone surrogate cannot be UTF-8 encoded; it becomes U+FFFD instead of crashing.
    assert tiny.encode("a\ud800b") == tiny.encode("a\ufffdb")
    assert tiny.tokenize("a\udfffb") == tiny.tokenize("a\ufffdb")


def test_build_prompt_format() -> None:
    prompt = ChatGLMTokenizer.build_prompt("q3", [("q1", "r1"), ("q2", "r2")])
    assert prompt == (
        "[Round 1]\n\n问：q1\n\n答：r1\n\n[Round 2]\n\n问：q2\n\n答：r2\n\n[Round 3]\n\n问：q3\n\n答："
    )
    assert ChatGLMTokenizer.build_prompt("hi") == "[Round 1]\n\n问：hi\n\n答："


def test_pad_batch_edge_cases(tiny: ChatGLMTokenizer) -> None:
    assert tiny.pad_batch([]) == ([], [], [])
    assert tiny.pad_batch([[], [5]]) == ([[0], [5]], [[0], [1]], [[0], [0]])


def test_decode_out_of_range_ids_are_dropped(tiny: ChatGLMTokenizer) -> None:
    # Padded-vocab rows (605..639) and negative ids decode to nothing, like specials.
    assert tiny.decode([tiny.gmask_id, 620, 381, 306, -1, 639]) == tiny.decode([381, 306])


def test_process_response() -> None:
    assert process_response("  你好,世界!\n") == "你好,世界!"  # no v1-style punctuation rewriting
    assert process_response("截至[[训练时间]]。 ") == "截至2023年。"
    assert process_response(" \n ") == ""


# -- streaming -------------------------------------------------------------------------------------


def _stream(tok: ChatGLMTokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


def _check_stream(tok: ChatGLMTokenizer, ids: list[int]) -> None:
    dec = StreamDecoder(tok)
    full = tok.decode(ids)
    released = ""
    for k, token_id in enumerate(ids, start=1):
        released += dec.push(token_id)
        assert dec.text == released
        # Released text never changes later and never contains a held-back partial character.
        assert full.startswith(released), (ids, k)
        assert tok.decode(ids[:k]).startswith(released), (ids, k)
    assert released + dec.flush() == full, ids


@pytest.mark.parametrize("kind", KINDS)
def test_stream_matches_decode_on_fixture_strings(kind: str, request: pytest.FixtureRequest) -> None:
    tok, exp = _load(kind, request)
    for c in exp["tricky"]:
        ids = c["encode"]
        _check_stream(tok, ids)
        _check_stream(tok, ids[2:])  # without the specials: the dummy-prefix space must be dropped
        _check_stream(tok, [tok.eos_id, *ids[2:], tok.eos_id])
    for c in exp["chat_prompts"]:
        _check_stream(tok, c["input_ids"])


@pytest.mark.parametrize("kind", KINDS)
def test_stream_holds_back_partial_utf8(kind: str, request: pytest.FixtureRequest) -> None:
    tok, exp = _load(kind, request)
    emoji = exp["misc"]["emoji_ids"]  # "▁" + the four byte pieces of 🏽
    deltas, rest = _stream(tok, emoji)
    assert deltas == ["", "", "", "", "🏽"]
    assert rest == ""
    deltas, rest = _stream(tok, emoji[:3])
    assert deltas == ["", "", ""]
    assert rest == "��"  # flushed like decode(): one U+FFFD per pending byte
    # An invalid byte (a lone continuation byte) is final at once and is released.
    lone = next(i for i in range(tok.sp_vocab_size) if tok.id_to_piece(i) == "<0x80>")
    assert tok.is_byte(lone)
    deltas, rest = _stream(tok, [lone])
    assert deltas == ["\ufffd"]
    assert rest == ""
    # A visible piece ends a byte run: bytes after it start a new run and are judged alone.
    byte_id = _byte_ids(tok)
    a = tok.encode("a", add_special_tokens=False)[-1]  # the piece "▁a"
    deltas, rest = _stream(tok, [a, byte_id[0xE4], a, byte_id[0xBD], byte_id[0xE4]])
    assert deltas == ["a", "", "\ufffd a", "\ufffd", ""]  # "▁a": the space shows after text
    assert rest == "\ufffd"


def test_stream_flush_starts_new_stream(tiny: ChatGLMTokenizer) -> None:
    dec = tiny.stream_decoder()
    ids = tiny.encode("Hello world", add_special_tokens=False)
    first = "".join(dec.push(i) for i in ids) + dec.flush()
    second = "".join(dec.push(i) for i in ids) + dec.flush()
    assert first == second == "Hello world"


def test_stream_accepts_tensor_ids(tiny: ChatGLMTokenizer) -> None:
    emoji = expected()["tokenizer"]["misc"]["emoji_ids"]
    dec = tiny.stream_decoder()
    assert [dec.push(t) for t in torch.tensor(emoji)] == ["", "", "", "", "🏽"]


def _byte_ids(tok: ChatGLMTokenizer) -> dict[int, int]:
    """byte value -> id of its ``<0xNN>`` piece"""
    return {int(tok.id_to_piece(i)[3:5], 16): i for i in range(259) if tok.is_byte(i)}


def _random_ids(tok: ChatGLMTokenizer, rng: random.Random, n: int) -> list[int]:
    byte_id = _byte_ids(tok)
    assert len(byte_id) == 256
    leads = [b for b in byte_id if b >= 0xC0]
    trails = [b for b in byte_id if 0x80 <= b < 0xC0]
    space = tok.encode(" x", add_special_tokens=False)[0]
    pool_other = [0, 1, 2, space, *tok.special_ids.values(), tok.vocab_size + 3, -1]
    ids: list[int] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            ids.append(byte_id[rng.choice(leads)])
        elif r < 0.55:
            ids.append(byte_id[rng.choice(trails)])
        elif r < 0.65:
            ids.append(byte_id[rng.randrange(0x80)])
        elif r < 0.8:
            ids.append(rng.choice(pool_other))
        else:
            ids.append(rng.randrange(tok.sp_vocab_size))
    return ids


@pytest.mark.parametrize("kind", KINDS)
def test_stream_matches_decode_on_random_ids(kind: str, request: pytest.FixtureRequest) -> None:
    tok, _ = _load(kind, request)
    rng = random.Random(1234)
    for _ in range(1000):
        _check_stream(tok, _random_ids(tok, rng, rng.randrange(0, 32)))


def test_stream_cost_is_linear(tiny: ChatGLMTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    ids = _random_ids(tiny, rng, 5000)
    decoded_pieces = 0
    original = tiny._decode_pieces

    def counting(pieces: list[str]) -> str:
        nonlocal decoded_pieces
        decoded_pieces += len(pieces)
        return original(pieces)

    monkeypatch.setattr(tiny, "_decode_pieces", counting)
    deltas, rest = _stream(tiny, ids)
    monkeypatch.undo()
    assert "".join(deltas) + rest == tiny.decode(ids)
    assert decoded_pieces < 4 * len(ids)
