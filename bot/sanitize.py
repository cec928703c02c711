"""Cleaning of user text before it reaches storage or the model."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except tab and newline; DEL. Carriage returns become newlines first.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def clean_user_text(text: str) -> str:
    """Normalise newlines, drop control characters and replace lone surrogates with U+FFFD; a
    text with nothing visible becomes empty.

    Lone surrogates cannot be encoded as UTF-8, so they would break the database driver and
    the tokenizer; a replacement character keeps the rest of the message intact.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SURROGATE.sub("\ufffd", text)
    text = _CONTROL.sub("", text).strip()
    return text if any(_visible(char) for char in text) else ""


def _visible(char: str) -> bool:
    """Not whitespace and not a format character (zero-width spaces and joiners, BOM, bidi
    controls: Unicode category Cf). Those stay inside text (a ZWJ joins an emoji sequence), but a
    message made only of them is empty."""
    return not char.isspace() and unicodedata.category(char) != "Cf"
