"""``ctx.ai``: the AI helper of stages and code-workflow steps.

``StageAI`` (a stage's ``ctx.ai``) and ``WorkflowAI`` (a code workflow's) make model calls
through the ``AIModelClient`` port (``ports/ai_models.py``; pydantic-ai in
``adapters/ai.py``), check the run's budget before each one, and record each call in the
attempt's ``AICallBuffer`` (``kernel/ai.py``, where recording and totals are described).
In a code workflow every ``generate_*`` is a journaled step. ``with_ai_config`` adds the
model settings to a stage's config.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel, Field, create_model

from treadle.kernel.ai import (
    AICall,
    AICallBuffer,
    AICallType,
    AIModelRequest,
    AIServices,
    TotalsReader,
    check_budget,
    current_buffer,
    model_label,
)
from treadle.kernel.errors import (
    AIExtraMissingError,
    BudgetExceededError,
    DefinitionError,
    StepFailedError,
    TreadleValidationError,
    describe_exception,
)
from treadle.kernel.model import JsonValue

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class AIResult(Generic[T]):
    """What ``ctx.ai.generate_text`` / ``generate_object`` return: the output (text, or an
    instance of the schema), the tokens it used and what it cost."""

    output: T
    model: str
    provider: str | None
    input_tokens: int
    output_tokens: int
    cost: Decimal | None
    """``None``: genai-prices knows no price for the model."""
    currency: str = "USD"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_json(self, output: JsonValue) -> dict[str, JsonValue]:
        """The journaled form (a code workflow's step result), ``output`` already JSON."""
        return {
            "output": output,
            "model": self.model,
            "provider": self.provider,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": None if self.cost is None else str(self.cost),
            "currency": self.currency,
        }

    @staticmethod
    def from_json(raw: dict[str, Any], output: Any) -> AIResult[Any]:
        cost = raw.get("cost")
        return AIResult(
            output=output,
            model=str(raw["model"]),
            provider=raw.get("provider"),
            input_tokens=int(raw["input_tokens"]),
            output_tokens=int(raw["output_tokens"]),
            cost=None if cost is None else Decimal(str(cost)),
            currency=str(raw.get("currency") or "USD"),
        )


async def generate(
    services: AIServices,
    buffer: AICallBuffer,
    totals: TotalsReader,
    request: AIModelRequest,
    *,
    call_type: AICallType,
    topic: str | None,
    now: Callable[[], datetime],
) -> AIResult[Any]:
    """One model call: the budget checked first, the call made through the client, and
    recorded in ``buffer`` whether it answered or raised."""
    await check_budget(totals, buffer.spent)
    client = services.client
    if client is None:
        raise AIExtraMissingError(
            "ctx.ai.generate_* has no model client: install the ai extra "
            "(pip install 'treadle[ai]') and open the engine again, or pass "
            "create_kernel(ai=AIServices(client=...))"
        )
    prompt: JsonValue = request.prompt
    if request.system is not None:
        prompt = [
            {"role": "system", "content": request.system},
            {"role": "user", "content": request.prompt},
        ]
    started = now()
    try:
        response = await client.generate(request)
    except Exception as exc:
        buffer.record(
            AICall(
                call_type=call_type,
                topic=topic,
                model=model_label(request.model),
                prompt=prompt,
                error=describe_exception(exc),
                latency=max(now() - started, timedelta(0)),
            )
        )
        raise
    buffer.record(
        AICall(
            call_type=call_type,
            topic=topic,
            provider=response.provider,
            model=response.model,
            prompt=prompt,
            response=response.response,
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            cost=response.cost,
            currency=response.currency,
            latency=max(now() - started, timedelta(0)),
        )
    )
    return AIResult(
        output=response.output,
        model=response.model,
        provider=response.provider,
        input_tokens=response.input_tokens,
        output_tokens=response.output_tokens,
        cost=response.cost,
        currency=response.currency,
    )


class AIConfig(BaseModel):
    """The AI fields ``with_ai_config`` adds to a stage's config: which model, how
    creative, how long an answer. Pass the config itself as the model
    (``ctx.ai.generate_text(ctx.config, prompt)``) to use all three."""

    model: str = Field(default="openai:gpt-4o-mini", min_length=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    max_tokens: int = Field(default=1024, ge=1)


def with_ai_config(
    config: type[BaseModel] | None = None,
    *,
    model: str = "openai:gpt-4o-mini",
    temperature: float = 0.7,
    max_tokens: int = 1024,
) -> type[AIConfig]:
    """``config`` (a pydantic model; none: an empty one) with ``model``, ``temperature``
    and ``max_tokens`` fields added, their defaults the values given here. A run's config
    for the stage is validated against it at ``run.create`` (a bad temperature names the
    field). ``DefinitionError`` if ``config`` already has one of the three fields, or a
    default is out of range."""
    base: Any = config if config is not None else BaseModel
    if not (isinstance(base, type) and issubclass(base, BaseModel)):  # called untyped
        raise DefinitionError(f"with_ai_config takes a pydantic model class, got {config!r}")
    clash = sorted(set(AIConfig.model_fields) & set(base.model_fields))
    if clash and not issubclass(base, AIConfig):
        raise DefinitionError(
            f"with_ai_config({base.__name__}): {base.__name__} already has field {clash[0]!r}"
        )
    try:
        defaults = AIConfig(model=model, temperature=temperature, max_tokens=max_tokens)
    except ValueError as exc:
        raise DefinitionError(f"with_ai_config: bad default: {exc}") from None
    fields: dict[str, Any] = {
        name: (info.annotation, Field(default=getattr(defaults, name), **_bounds(name)))
        for name, info in AIConfig.model_fields.items()
    }
    name = f"{base.__name__}WithAI" if config is not None else "AIStageConfig"
    bases: tuple[type[Any], ...] = (base, AIConfig) if base is not BaseModel else (AIConfig,)
    made: Any = create_model(name, __base__=bases, **fields)
    made.__module__ = base.__module__ if config is not None else __name__
    return cast("type[AIConfig]", made)


_BOUNDS: dict[str, dict[str, Any]] = {
    "model": {"min_length": 1},
    "temperature": {"ge": 0.0, "le": 2.0, "allow_inf_nan": False},
    "max_tokens": {"ge": 1},
}


def _bounds(name: str) -> dict[str, Any]:
    return _BOUNDS[name]


def _request(
    model: object,
    prompt: object,
    schema: type | None,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> AIModelRequest:
    if isinstance(model, AIConfig):  # a with_ai_config stage config: its three fields
        temperature = model.temperature if temperature is None else temperature
        max_tokens = model.max_tokens if max_tokens is None else max_tokens
        model = model.model
    if not isinstance(prompt, str) or not prompt:
        raise TreadleValidationError(
            f"prompt must be a non-empty string, got {prompt!r}", [("prompt", "empty")]
        )
    if model is None or model == "":
        raise TreadleValidationError("model is required", [("model", "missing")])
    return AIModelRequest(
        model=model,
        prompt=prompt,
        system=system,
        schema=schema,
        temperature=temperature,
        max_tokens=max_tokens,
    )


class StageAI:
    """``ctx.ai`` in a pipeline stage: makes and records this attempt's AI calls, which
    commit with the attempt's outcome (``kernel/ai.py`` module docstring)."""

    def __init__(
        self,
        buffer: AICallBuffer,
        services: AIServices,
        totals: TotalsReader,
        now: Callable[[], datetime],
    ) -> None:
        self._buffer = buffer
        self._services = services
        self._totals = totals
        self._now = now

    @property
    def calls(self) -> list[AICall]:
        """The calls this attempt recorded so far (not committed yet)."""
        return list(self._buffer.calls)

    def record(self, call: AICall) -> AICall:
        """Record ``call``, made by this stage attempt; returns it as it will be stored."""
        return self._buffer.record(call)

    async def check_budget(self) -> None:
        """``BudgetExceededError`` if the run's AI cost (committed, plus this attempt's
        calls so far) has reached its ``max_cost``: call it before a model call made
        without ``generate_*`` (an agent's request)."""
        await check_budget(self._totals, self._buffer.spent)

    async def generate_text(
        self,
        model: object,
        prompt: str,
        *,
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        topic: str | None = None,
    ) -> AIResult[str]:
        """Ask ``model`` (``"openai:gpt-4o"`` or a pydantic-ai ``Model``) for text. The
        budget is checked first; the call is recorded (cost by genai-prices) and returned
        with its usage and cost. Provider errors raise (429 / overloaded as the retryable
        ``AIRateLimitedError``): the stage's retry policy decides what happens next."""
        request = _request(model, prompt, None, system, temperature, max_tokens)
        return await generate(
            self._services,
            self._buffer,
            self._totals,
            request,
            call_type="text",
            topic=topic,
            now=self._now,
        )

    async def generate_object(
        self,
        model: object,
        prompt: str,
        *,
        schema: type[M],
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        topic: str | None = None,
    ) -> AIResult[M]:
        """As ``generate_text``, the answer validated as ``schema`` (a pydantic model)."""
        request = _request(model, prompt, schema, system, temperature, max_tokens)
        return await generate(
            self._services,
            self._buffer,
            self._totals,
            request,
            call_type="object",
            topic=topic,
            now=self._now,
        )


StepRunner = Callable[..., Awaitable[Any]]
"""``WorkflowContext.step``: ``await step(name, fn, retry=..., timeout=...)``."""


class WorkflowAI:
    """``ctx.ai`` in a code workflow: ``record`` belongs to the step running in this task,
    committed with its journal entry; ``generate_*`` are journaled steps of their own
    (``kernel/ai.py`` module docstring)."""

    def __init__(
        self,
        services: AIServices,
        totals: TotalsReader,
        step: StepRunner,
        now: Callable[[], datetime],
    ) -> None:
        self._services = services
        self._totals = totals
        self._step = step
        self._now = now

    def record(self, call: AICall) -> AICall:
        """Record ``call``, made by the step running now; ``AIRecordError`` outside a step."""
        return current_buffer().record(call)

    async def check_budget(self) -> None:
        """Inside a step: ``BudgetExceededError`` if the run's AI cost (committed, plus
        this step attempt's calls) has reached its ``max_cost``."""
        await check_budget(self._totals, current_buffer().spent)

    async def generate_text(
        self,
        model: object,
        prompt: str,
        *,
        name: str = "ai.generate_text",
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        topic: str | None = None,
        retry: Any = None,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - mirrors ctx.step
    ) -> AIResult[str]:
        """A journaled step ``name`` that asks ``model`` for text: a replay returns the
        journaled answer without calling the model. Retries follow ``retry`` (the step's
        ``RetryPolicy``); a 429 waits at least the provider's retry-after, durably. Past
        the run's budget it raises ``BudgetExceededError`` before calling."""
        request = _request(model, prompt, None, system, temperature, max_tokens)
        raw = await self._journaled(name, request, "text", topic, retry, timeout)
        return AIResult.from_json(raw, str(raw["output"]))

    async def generate_object(
        self,
        model: object,
        prompt: str,
        *,
        schema: type[M],
        name: str = "ai.generate_object",
        system: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        topic: str | None = None,
        retry: Any = None,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - mirrors ctx.step
    ) -> AIResult[M]:
        """As ``generate_text``, the answer validated as ``schema`` (also on replay)."""
        request = _request(model, prompt, schema, system, temperature, max_tokens)
        raw = await self._journaled(name, request, "object", topic, retry, timeout)
        return AIResult.from_json(raw, schema.model_validate(raw["output"]))

    async def _journaled(
        self,
        name: str,
        request: AIModelRequest,
        call_type: AICallType,
        topic: str | None,
        retry: Any,
        timeout: timedelta | float | None,  # noqa: ASYNC109 - mirrors ctx.step
    ) -> dict[str, Any]:
        services, totals, now = self._services, self._totals, self._now

        async def call() -> dict[str, Any]:
            result = await generate(
                services,
                current_buffer(),
                totals,
                request,
                call_type=call_type,
                topic=topic,
                now=now,
            )
            output = result.output
            if isinstance(output, BaseModel):
                output = output.model_dump(mode="json")
            return result.to_json(output)

        try:
            raw: dict[str, Any] = await self._step(name, call, retry=retry, timeout=timeout)
        except StepFailedError as exc:
            prefix = f"{BudgetExceededError.__name__}: "
            if (exc.error or "").startswith(prefix):  # also when replayed from the journal
                raise BudgetExceededError((exc.error or "")[len(prefix) :]) from exc
            raise
        return raw
