"""Text every backend stores: no NUL character (PostgreSQL refuses it) and no lone
surrogate (it has no UTF-8 form). The lowest floor of the kernel: ``errors`` and
``limits`` both build on it."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why a string cannot be stored, or ``None``."""
    if "\x00" in text:
        return "contains a NUL character"
    if not text.isascii() and _SURROGATE.search(text) is not None:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def safe_text(text: str) -> str:
    """``text`` with NUL characters and lone surrogates escaped (``\\x00``, ``\\ud800``),
    for text Treadle stores on its own account (error messages), which must not fail."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii() and _SURROGATE.search(text) is not None:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
