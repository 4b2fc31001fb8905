"""``PydanticAIClient``: the AIModelClient port over pydantic-ai, priced by genai-prices.

Both libraries come with the ``ai`` extra and are imported on the first call, so a plain
install imports (and runs) Treadle without them; a call without them raises
``AIExtraMissingError``. A model is a name pydantic-ai knows (``"openai:gpt-4o"``,
``"anthropic:claude-sonnet-4-0"``) or a pydantic-ai ``Model`` instance (tests pass
``TestModel`` or ``FunctionModel(fn, model_name="gpt-4o-mini")``, which genai-prices then
prices as that model). Provider rate limits (429) and overloads become the retryable
``AIRateLimitedError`` with the provider's retry-after.
"""

from __future__ import annotations

import inspect
from decimal import Decimal
from typing import Any

from treadle.kernel.ai import AIModelRequest, AIModelResponse, model_label
from treadle.kernel.errors import AIExtraMissingError, AIRateLimitedError

_NOT_PROVIDERS = frozenset({"function", "test"})
"""``Model.system`` of pydantic-ai's test models: no provider to price them by."""

_BUSY_STATUSES = frozenset({429, 503, 529})
"""HTTP statuses that mean "try again later": rate limited, unavailable, overloaded."""


def _missing(exc: ImportError) -> AIExtraMissingError:
    return AIExtraMissingError(
        f"ctx.ai.generate_* needs the ai extra (pip install 'treadle[ai]'): {exc}"
    )


class PydanticAIClient:
    """One pydantic-ai ``Agent`` run per request (its output type: ``str`` or the
    schema), usage summed over the run's requests, cost from ``genai_prices.calc_price``."""

    async def generate(self, request: AIModelRequest) -> AIModelResponse:
        try:
            from pydantic_ai import Agent
            from pydantic_ai.exceptions import ModelAPIError, ModelHTTPError
        except ImportError as exc:
            raise _missing(exc) from exc
        settings: dict[str, Any] = {}
        if request.temperature is not None:
            settings["temperature"] = request.temperature
        if request.max_tokens is not None:
            settings["max_tokens"] = request.max_tokens
        agent: Any = Agent(
            request.model,  # type: ignore[call-overload]  # a name or a Model, as pydantic-ai takes
            output_type=request.schema or str,
            instructions=request.system,
        )
        try:
            result = await agent.run(request.prompt, model_settings=settings or None)
        except ModelAPIError as exc:
            status = exc.status_code if isinstance(exc, ModelHTTPError) else None
            kind = type(exc).__name__
            if status in _BUSY_STATUSES or kind in ("ModelRateLimitError", "ModelOverloadedError"):
                raise AIRateLimitedError(
                    f"{model_label(request.model)}: {exc}",
                    retry_after=getattr(exc, "retry_after", None),
                ) from exc
            raise
        usage = result.usage  # a property since pydantic-ai 2 (a method before)
        if inspect.ismethod(usage):
            usage = usage()
        response = result.response
        model_name = response.model_name or model_label(request.model)
        provider = response.provider_name or _provider_of(request.model)
        output = result.output
        return AIModelResponse(
            output=output,
            model=model_name,
            provider=provider,
            input_tokens=int(usage.input_tokens or 0),
            output_tokens=int(usage.output_tokens or 0),
            cost=price(usage, model_name, provider),
            response=output if isinstance(output, str) else output.model_dump(mode="json"),
        )


def _provider_of(model: object) -> str | None:
    if isinstance(model, str):
        return model.split(":", 1)[0] if ":" in model else None
    system = getattr(model, "system", None)
    return system if isinstance(system, str) and system not in _NOT_PROVIDERS else None


def price(usage: Any, model_name: str, provider: str | None) -> Decimal | None:
    """The call's cost by genai-prices, ``None`` when it knows no price for the model."""
    try:
        import genai_prices
    except ImportError as exc:
        raise _missing(exc) from exc
    try:
        found = genai_prices.calc_price(
            usage,
            model_name,
            provider_id=provider if provider not in _NOT_PROVIDERS else None,
        )
    except LookupError:
        return None
    return Decimal(found.total_price)
