"""The AI-layer tests need the ``ai`` extra (pydantic-ai, genai-prices, the OpenAI and
Anthropic SDKs); without it they are not collected, so the plain install's suite runs."""

from __future__ import annotations

import importlib.util

_EXTRA = ("pydantic_ai", "genai_prices", "openai", "anthropic")

collect_ignore_glob = (
    [] if all(importlib.util.find_spec(m) for m in _EXTRA) else ["test_*.py", "providers.py"]
)
