"""Treadle's AI layer on pydantic-ai and the providers' SDKs (the ``ai`` extra).

``treadle.ai.agents``: ``TreadleAgent`` / ``TreadleDurability``, durable pydantic-ai
agents in code workflows. ``treadle.ai.batches``: ``define_ai_batch_stage``, provider
batch APIs as batch stages. The names load on first use (PEP 562), so ``import treadle``
and ``import treadle.ai`` work on the plain install; using one needs the ``ai`` extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treadle.ai.agents import TreadleAgent, TreadleDurability, current_workflow, running_in
    from treadle.ai.batches import (
        AIBatchItem,
        AIBatchOutput,
        AIBatchPrompt,
        batch_price,
        define_ai_batch_stage,
    )

_MODULES = {
    "TreadleAgent": "treadle.ai.agents",
    "TreadleDurability": "treadle.ai.agents",
    "current_workflow": "treadle.ai.agents",
    "running_in": "treadle.ai.agents",
    "AIBatchItem": "treadle.ai.batches",
    "AIBatchOutput": "treadle.ai.batches",
    "AIBatchPrompt": "treadle.ai.batches",
    "batch_price": "treadle.ai.batches",
    "define_ai_batch_stage": "treadle.ai.batches",
}

__all__ = [
    "AIBatchItem",
    "AIBatchOutput",
    "AIBatchPrompt",
    "TreadleAgent",
    "TreadleDurability",
    "batch_price",
    "current_workflow",
    "define_ai_batch_stage",
    "running_in",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'treadle.ai' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
