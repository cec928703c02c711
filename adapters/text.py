"""Platform-neutral text helpers for adapters: splitting a long answer into message-sized chunks.

Chat platforms cap a message's size (Slack by bytes, Discord by characters), so a long answer is
sent as several messages. A cut should fall where a reader expects one (a paragraph, a line, a
sentence) and a Markdown code block cut in two must stay a code block on both sides, so each
chunk that ends inside a ``` fence closes it and the next chunk reopens it with the same language.
"""

from __future__ import annotations

import re
from collections.abc import Callable

FENCE = "```"
_CLOSE = "\n" + FENCE
# Sentence ends: Latin punctuation followed by whitespace, or CJK punctuation (no space follows it).
_SENTENCE_END = re.compile(r"[.!?…](?=\s)|[。！？]")
_LEADING_SPACE = re.compile(r"\s*")
# Only a fence's language word is re-emitted when a block is reopened, so keep it short.
_LANG = re.compile(r"[\w+#.-]{0,20}")


def split_message(text: str, limit: int, *, measure: Callable[[str], int] = len) -> list[str]:
    """Split ``text`` into chunks each measuring at most ``limit``.

    ``measure`` gives a chunk's size as the platform counts it (e.g. UTF-8 bytes after escaping);
    it must be monotone: a longer string never measures less than its prefix. Cuts prefer a
    paragraph break, then a line break, then a sentence end, then a space, and only then fall
    mid-word. Whitespace at a cut is dropped (the indentation of the next line is kept). A chunk
    that ends inside a code fence is closed with ``` and the next one reopens it. Text that fits
    is returned unchanged as one chunk; empty or whitespace-only text gives no chunks.

    Raises ValueError if ``limit`` is too small to hold a reopened fence plus one character.
    """
    if not text.strip():
        return []
    if measure(text) <= limit:
        return [text]
    chunks: list[str] = []
    rest = text.strip("\n")
    fence: str | None = None  # the opening line of the code block that `rest` starts inside of
    while rest.strip():
        if fence is not None and _is_closing_fence(rest.split("\n", 1)[0]):
            # The previous chunk already closed this block; its own closing line is redundant.
            fence = None
            rest = _drop_leading_space(rest.split("\n", 1)[1] if "\n" in rest else "")
            continue
        prefix = _reopen(fence)
        whole = prefix + rest
        end_fence = _fence_after(rest, fence)
        if measure(whole + (_CLOSE if end_fence else "")) <= limit:
            chunks.append(whole + (_CLOSE if end_fence else ""))
            break
        fits = _longest_fitting(rest, prefix, fence, limit, measure)
        cut = _best_cut(rest, fits)
        body = rest[:cut].rstrip()
        if not body:  # only whitespace before the cut: cut hard instead
            cut = fits
            body = rest[:cut]
        fence = _fence_after(body, fence)
        chunks.append(prefix + body + (_CLOSE if fence else ""))
        rest = _drop_leading_space(rest[cut:])
    return chunks


def _longest_fitting(
    rest: str, prefix: str, fence: str | None, limit: int, measure: Callable[[str], int]
) -> int:
    """The largest n such that ``prefix + rest[:n]`` fits, with room for a closing fence if the
    cut may fall inside a code block.

    Doubling finds a bound first, so a long text costs measures of chunk-sized strings only.
    """

    def fits(n: int, suffix: str) -> bool:
        return measure(prefix + rest[:n] + suffix) <= limit

    def longest(suffix: str) -> int:
        high = 1
        while high < len(rest) and fits(high, suffix):
            high *= 2
        low, high = high // 2, min(high, len(rest))
        if low == 0 and not fits(0, suffix):
            return 0
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid, suffix):
                low = mid
            else:
                high = mid - 1
        return low

    size = longest("")
    if fence is not None or FENCE in rest[:size]:
        size = longest(_CLOSE)
    if size == 0:
        raise ValueError(f"limit {limit} is too small to split this text")
    return size


def _best_cut(rest: str, fits: int) -> int:
    """Where to cut ``rest`` given that its first ``fits`` characters fit.

    A boundary is only taken if it keeps at least half of the room, so one early paragraph
    break does not produce a tiny chunk.
    """
    window = rest[:fits]
    floor = max(1, fits // 2)
    paragraph = window.rfind("\n\n")
    if paragraph >= floor:
        return paragraph
    line = window.rfind("\n")
    if line >= floor:
        return line
    # One character past the window lets the lookahead see the space after a final full stop.
    sentence_ends = [m.end() for m in _SENTENCE_END.finditer(rest[: fits + 1]) if m.end() <= fits]
    if sentence_ends and sentence_ends[-1] >= floor:
        return sentence_ends[-1]
    space = max(window.rfind(" "), window.rfind("\t"))
    if space >= floor:
        return space
    return fits


def _drop_leading_space(text: str) -> str:
    """Drop the whitespace that separated two chunks, keeping the indentation of a new line."""
    lead = _LEADING_SPACE.match(text)
    run = lead.group() if lead else ""
    if "\n" in run:
        return text[run.rindex("\n") + 1 :]
    return text[len(run) :]


def _is_closing_fence(line: str) -> bool:
    # As in CommonMark, a closing fence carries no info string.
    stripped = line.strip()
    return stripped.startswith(FENCE) and not stripped.strip("`")


def _fence_after(body: str, fence: str | None) -> str | None:
    """The open fence's opening line after ``body``, starting from state ``fence``."""
    for line in body.split("\n"):
        if fence is None and line.lstrip().startswith(FENCE):
            fence = line.strip()
        elif fence is not None and _is_closing_fence(line):
            fence = None
    return fence


def _reopen(fence: str | None) -> str:
    if fence is None:
        return ""
    lang = _LANG.match(fence[len(FENCE) :].strip())
    return FENCE + (lang.group() if lang else "") + "\n"
