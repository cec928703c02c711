"""split_message: size limits, natural cut points, balanced code fences, nothing lost."""

from __future__ import annotations

import random
import re

import pytest

from adapters.text import split_message


def _words(chunks: list[str]) -> list[str]:
    """The text's words with the fence lines the splitter added removed."""
    return " ".join(chunks).split()


def _fences(chunk: str) -> int:
    return sum(1 for line in chunk.split("\n") if line.lstrip().startswith("```"))


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


def test_short_text_is_one_unchanged_chunk() -> None:
    assert split_message("hello\n\nworld ", 100) == ["hello\n\nworld "]


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_empty_text_gives_no_chunks(text: str) -> None:
    assert split_message(text, 100) == []


def test_cuts_at_paragraph_breaks_first() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 15 + "end." for i in range(6)]
    text = "\n\n".join(paragraphs)
    chunks = split_message(text, 250)
    assert len(chunks) > 1
    assert all(len(c) <= 250 for c in chunks)
    # Every chunk is made of whole paragraphs.
    for chunk in chunks:
        for part in chunk.split("\n\n"):
            assert part in paragraphs
    assert "\n\n".join(chunks) == text


def test_falls_back_to_sentences_then_spaces() -> None:
    sentences = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = split_message(sentences, 120)
    assert all(len(c) <= 120 for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == sentences

    no_punct = " ".join(f"word{i}" for i in range(200))
    chunks = split_message(no_punct, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert " ".join(chunks) == no_punct  # cut only at spaces: no word broken


def test_cjk_sentences_split_after_full_stop() -> None:
    text = "这是一个句子。" * 100
    chunks = split_message(text, 50)
    assert all(len(c) <= 50 for c in chunks)
    assert all(c.endswith("。") for c in chunks)
    assert "".join(chunks) == text


def test_unbroken_text_is_cut_hard() -> None:
    text = "x" * 1000
    chunks = split_message(text, 300)
    assert [len(c) for c in chunks] == [300, 300, 300, 100]


def test_code_fences_stay_balanced_and_reopen_with_language() -> None:
    code = "\n".join(f"    line_{i} = compute({i})" for i in range(80))
    text = "Here is the code:\n\n```python\n" + code + "\n```\n\nThat was the code."
    chunks = split_message(text, 500)
    assert len(chunks) > 2
    assert all(len(c) <= 500 for c in chunks)
    for chunk in chunks:
        assert _fences(chunk) % 2 == 0, chunk
    for chunk in chunks[1:-1]:
        assert chunk.startswith("```python\n")
    # Indentation survives the cuts and no code line is lost or broken.
    lines = [ln for c in chunks for ln in c.split("\n") if "line_" in ln]
    assert lines == code.split("\n")
    assert chunks[-1].endswith("That was the code.")


def test_unclosed_fence_at_the_end_is_closed_in_the_last_chunk() -> None:
    text = "```\n" + "\n".join(f"row {i}" for i in range(100))
    chunks = split_message(text, 200)
    assert all(_fences(c) == 2 for c in chunks)
    assert all(len(c) <= 200 for c in chunks)


def test_measure_counts_utf8_bytes() -> None:
    text = "é" * 3000 + " " + "日本語のテキスト。" * 300
    chunks = split_message(text, 1000, measure=utf8)
    assert all(utf8(c) <= 1000 for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_measure_with_escaping_keeps_escaped_size_under_limit() -> None:
    def escaped(s: str) -> int:
        return utf8(s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))

    text = "<&> " * 2000
    chunks = split_message(text, 3500, measure=escaped)
    assert len(chunks) >= 3
    assert all(escaped(c) <= 3500 for c in chunks)
    assert _words(chunks) == text.split()


def test_twelve_thousand_characters_keep_every_word() -> None:
    text = "\n\n".join(" ".join(f"w{p}_{i}" for i in range(150)) + "." for p in range(13))
    assert len(text) > 12000
    chunks = split_message(text, 3500, measure=utf8)
    assert len(chunks) <= -(-len(text) // 3500) + 1  # paragraph cuts waste little room
    assert all(utf8(c) <= 3500 for c in chunks)
    assert _words(chunks) == text.split()
    assert all(re.search(r"\.\Z", c) for c in chunks)  # every cut is at a paragraph end


def test_too_small_limit_is_an_error() -> None:
    with pytest.raises(ValueError):
        split_message("```python\n" + "x" * 100 + "\n```", 4)


@pytest.mark.parametrize("seed", range(30))
def test_random_markdown_respects_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    pieces = []
    for _ in range(rng.randint(5, 60)):
        kind = rng.random()
        if kind < 0.2:
            body = "\n".join("  " + " ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(9))
            pieces.append(f"\n```{rng.choice(['', 'py', 'bash'])}\n{body}\n```\n")
        else:
            pieces.append(
                " ".join(rng.choices(WORDS, k=rng.randint(1, 80))) + rng.choice([".", "!", "。", ""])
            )
    text = rng.choice(["\n\n", "\n", " "]).join(pieces)
    limit = rng.randint(60, 700)
    chunks = split_message(text, limit, measure=utf8)
    assert all(utf8(c) <= limit for c in chunks)
    assert all(_fences(c) % 2 == 0 for c in chunks)
    kept = [w for w in _words(chunks) if not w.startswith("```")]
    original = [w for w in text.split() if not w.startswith("```")]
    # Hard cuts may split a long word in two; joined back, nothing is lost or reordered.
    assert "".join(kept) == "".join(original)


WORDS = ["alpha", "beta", "<&>", "é", "日本語", "x" * 30, "end.", "why?", "ok"]
