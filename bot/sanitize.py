"""Cleaning of user text before it reaches storage or the model."""

from __future__ import annotations

import re

# C0/C1 controls except tab and newline; DEL. Carriage returns become newlines first.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Normalise newlines, drop control characters and replace lone surrogates with U+FFFD.

    Lone surrogates cannot be encoded as UTF-8, so they would break the database driver and
    the tokenizer; a replacement character keeps the rest of the message intact.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SURROGATE.sub("\ufffd", text)
    text = _CONTROL.sub("", text)
    return text.strip()
