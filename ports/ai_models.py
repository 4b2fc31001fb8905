"""The AIModelClient port: how ``ctx.ai.generate_*`` reaches a model.

The kernel builds the request (model, prompt, settings, the output schema) and records
the call; the client only talks to the provider and prices the answer. The pydantic-ai
implementation is ``treadle.adapters.ai.PydanticAIClient`` (the ``ai`` extra); tests may
pass pydantic-ai's ``TestModel`` / ``FunctionModel`` as the model.
"""

from __future__ import annotations

from typing import Protocol

from treadle.kernel.ai import AIModelRequest, AIModelResponse


class AIModelClient(Protocol):
    async def generate(self, request: AIModelRequest) -> AIModelResponse:
        """Make one request. Returns the answer with usage and cost; a provider error
        raises (``AIRateLimitedError`` for 429 / overloaded, with its retry-after), and
        its cost, if any was reported, is lost with it."""
