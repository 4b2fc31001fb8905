"""Durable pydantic-ai agents: ``TreadleAgent(agent)`` runs an ``Agent`` inside a code
workflow, each model request and each tool call a journaled step.

Built on pydantic-ai's durable-execution extension point (``pydantic_ai.durable_exec``),
the one its Temporal, DBOS and Prefect integrations use: ``TreadleDurability`` is a
``BaseDurabilityCapability`` whose ``CallableOperationBackend`` runs each durable
operation pydantic-ai hands it (each model request, each tool call, and for MCP and
dynamic toolsets their tool discovery) as ``ctx.step`` of the workflow the agent runs
in. Values cross the journal as JSON (``JSON_CODEC``: pydantic-ai's own ``TypeAdapter``
of ``ModelResponse`` and of tool results), so a replay of the body, on any worker, gets
the recorded response back without calling the model again.

Replay determinism: the journal keys steps by (name, occurrence) in the order the body
reaches them, so tool calls run one at a time inside a workflow
(``sequential_tools_in_durable_context``); outside a workflow the agent runs as it would
without Treadle.

A tool that waits for a person or a signal calls ``ctx.review`` / ``ctx.wait_for_signal``
itself, so it must not run inside a step (a step's function may not make ``ctx`` calls):
declare it with ``durable=False`` (``@agent.tool_plain(durable=False)``); the waits it
makes are durable boundaries of their own. Such a tool runs again on every replay up to
its wait, so keep its other effects in ``ctx.step`` calls.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Generic

from pydantic import TypeAdapter
from pydantic_ai.durable_exec import (
    JSON_CODEC,
    BaseDurabilityCapability,
    DurabilityEngineSpec,
    DurableOperationBackend,
    DurableOperationId,
    JournalCallableOperationBackend,
    ModelRequestId,
    RoleBasedOperationConfig,
)
from pydantic_ai.exceptions import ModelAPIError, ModelHTTPError
from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelResponse
from pydantic_ai.tools import AgentDepsT

from treadle.kernel.ai import AICall
from treadle.kernel.errors import (
    AgentOutsideWorkflowError,
    AIRateLimitedError,
    NonDeterminismError,
    OutputValidationError,
    describe_exception,
)
from treadle.kernel.model import JsonValue
from treadle.kernel.retry import RetryPolicy
from treadle.kernel.workflows.waits import Interrupt

if TYPE_CHECKING:
    from pydantic_ai.agent import AbstractAgent, AgentRunResult

    from treadle.kernel.workflows.context import WorkflowContext

_CURRENT: contextvars.ContextVar[WorkflowContext | None] = contextvars.ContextVar(
    "treadle_agent_workflow", default=None
)
"""The workflow context of the agent run in progress in this task (``TreadleAgent.run``)."""


def _serialization_failure(exc: Exception) -> BaseException:
    """A value pydantic-ai cannot reduce to JSON fails its step for good (never retried)."""
    return OutputValidationError(f"an agent step returned a value that is not JSON: {exc}")


_RESPONSE: TypeAdapter[ModelResponse] = TypeAdapter(ModelResponse)


def _new_messages(messages: object) -> JsonValue:
    """The request's new messages (those after the model's last answer) as JSON: what
    this request added to the conversation, not the whole history again."""
    if not isinstance(messages, list) or not messages:
        return None
    start = 0
    for i, message in enumerate(messages):
        if isinstance(message, ModelResponse):
            start = i + 1
    dumped: JsonValue = ModelMessagesTypeAdapter.dump_python(messages[start:], mode="json")
    return dumped


def _cost(response: ModelResponse) -> Decimal | None:
    """genai-prices' price of the response (``None`` for a model it does not price)."""
    try:
        return Decimal(str(response.cost().total_price))
    except (LookupError, ValueError):
        return None


def _request_call(payload: object, messages: object, started: float, topic: str) -> AICall:
    """The AI call of one model request that answered."""
    response = _RESPONSE.validate_python(payload)
    model = response.model_name or "unknown"
    return AICall(
        topic=topic,
        call_type="agent-request",
        provider=response.provider_name or _provider_of(model),
        model=model,
        prompt=_new_messages(messages),
        response=payload,  # the JSON codec's output
        input_tokens=response.usage.input_tokens,
        output_tokens=response.usage.output_tokens,
        cost=_cost(response),
        latency=timedelta(seconds=time.monotonic() - started),
    )


def _failed_request(
    operation_id: ModelRequestId, messages: object, exc: Exception, started: float, topic: str
) -> AICall:
    """The AI call of one model request that raised (no answer, nothing priced)."""
    model = operation_id.model_name or operation_id.model_id or "unknown"
    return AICall(
        topic=topic,
        call_type="agent-request",
        provider=_provider_of(model),
        model=model,
        prompt=_new_messages(messages),
        error=describe_exception(exc),
        latency=timedelta(seconds=time.monotonic() - started),
    )


_BUSY_STATUSES = frozenset({429, 503, 529})
"""HTTP statuses that mean "try again later": rate limited, unavailable, overloaded."""


def _rate_limited(exc: Exception) -> AIRateLimitedError | None:
    """A provider's 429 / overloaded as ``AIRateLimitedError``, whose ``retry_after`` (the
    provider's ``Retry-After``) the step's retry waits at least, durably."""
    if not isinstance(exc, ModelAPIError):
        return None
    status = exc.status_code if isinstance(exc, ModelHTTPError) else None
    busy = type(exc).__name__ in ("ModelRateLimitError", "ModelOverloadedError")
    if status not in _BUSY_STATUSES and not busy:
        return None
    return AIRateLimitedError(f"{exc}", retry_after=exc.retry_after)


def _provider_of(model: str) -> str | None:
    provider, sep, _ = model.partition(":")
    return provider if sep else None


class TreadleOperationBackend(JournalCallableOperationBackend[RetryPolicy | None]):
    """Runs each durable operation as one ``ctx.step`` of the current workflow; its
    journal name is pydantic-ai's stable journal name (``<agent>__model.request``,
    ``<agent>__function_toolset__<id>.call_tool:<tool>``, ...)."""

    def __init__(
        self,
        *,
        agent_name: str,
        default_model_id: str | None,
        model_retry: RetryPolicy | None,
        tool_retry: RetryPolicy | None,
    ) -> None:
        super().__init__(
            agent_name=agent_name,
            default_model_id=default_model_id,
            config=RoleBasedOperationConfig(
                model=model_retry, event=None, capability=None, tool=tool_retry
            ),
        )
        self._topic = agent_name

    async def execute(
        self,
        *,
        operation_id: DurableOperationId,
        name: str,
        body: Callable[[], Awaitable[object]],
        cache_key: tuple[object, ...],
        config: RetryPolicy | None,
    ) -> object:
        ctx = _CURRENT.get()
        if ctx is None:
            raise AgentOutsideWorkflowError(
                f"durable agent operation {name!r} ran outside TreadleAgent.run(ctx, ...)"
            )
        if not isinstance(operation_id, ModelRequestId):
            return await ctx.step(name, body, retry=config)
        messages = cache_key[1] if len(cache_key) > 1 else None
        topic = self._topic

        async def step():  # type: ignore[no-untyped-def]  # no annotation: journaled as JSON
            await ctx.ai.check_budget()  # BudgetExceededError: this request is not made
            started = time.monotonic()
            try:
                payload = await body()
            except Exception as exc:
                ctx.ai.record(_failed_request(operation_id, messages, exc, started, topic))
                limited = _rate_limited(exc)
                if limited is not None:
                    raise limited from exc
                raise
            ctx.ai.record(_request_call(payload, messages, started, topic))
            return payload

        return await ctx.step(name, step, retry=config)


class TreadleDurability(BaseDurabilityCapability[AgentDepsT]):
    """The pydantic-ai durability capability for Treadle code workflows (see the module
    docstring). ``TreadleAgent`` attaches it; attach it yourself with
    ``Agent(..., capabilities=[TreadleDurability()])`` and run the agent inside
    ``with running_in(ctx):``."""

    engine_spec = DurabilityEngineSpec(
        engine_name="Treadle",
        durable_unit_noun="step",
        durable_unit_plural="steps",
        durable_container_noun="workflow",
        codec=JSON_CODEC,
        serialization_failure=_serialization_failure,
        wrapped_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        toolset_lifecycles={
            "function": "enter-always",
            "mcp": "enter-in-durable-unit",
            "dynamic": "enter-never",
        },
        journal_discovery=True,
        sequential_tools_in_durable_context=True,
        control_flow_error_types=(Interrupt,),
        nondeterminism_error_types=(NonDeterminismError,),
    )

    def __init__(
        self,
        *,
        name: str | None = None,
        model_retry: RetryPolicy | None = None,
        tool_retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(name=name)
        self._model_retry = model_retry
        self._tool_retry = tool_retry

    @property
    def in_durable_context(self) -> bool:
        return _CURRENT.get() is not None

    def get_durable_operation_backend(self) -> DurableOperationBackend[Any]:
        return TreadleOperationBackend(
            agent_name=self.name,
            default_model_id=self.default_model_id,
            model_retry=self._model_retry,
            tool_retry=self._tool_retry,
        )

    async def durable_sleep(self, seconds: float) -> None:
        ctx = _CURRENT.get()
        assert ctx is not None
        await ctx.sleep(max(seconds, 0.001), name=f"{self.name}__sleep")


def current_workflow() -> WorkflowContext:
    """The workflow context of the ``TreadleAgent.run`` in progress: what a tool declared
    ``durable=False`` calls ``review``, ``wait_for_signal`` or ``step`` on."""
    ctx = _CURRENT.get()
    if ctx is None:
        raise AgentOutsideWorkflowError(
            "current_workflow() is only available while TreadleAgent.run(ctx, ...) runs"
        )
    step = ctx.current_step()
    if step is not None:
        # A durable tool runs inside a step, whose function may make no ctx call: the
        # call would be journaled inside the step and break the next replay.
        raise AgentOutsideWorkflowError(
            f"current_workflow() was called inside step {step.name!r}: a tool that waits "
            "or makes ctx calls must be declared durable=False "
            "(@agent.tool_plain(durable=False))"
        )
    return ctx


@contextmanager
def running_in(ctx: WorkflowContext) -> Iterator[None]:
    """Run the agents of this block (with a ``TreadleDurability``) in workflow ``ctx``."""
    token = _CURRENT.set(ctx)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class TreadleAgent(Generic[AgentDepsT]):
    """A pydantic-ai ``Agent`` made durable: ``await TreadleAgent(agent).run(ctx, prompt)``
    inside a ``@workflow`` body."""

    def __init__(
        self,
        agent: AbstractAgent[AgentDepsT, Any],
        *,
        name: str | None = None,
        model_retry: RetryPolicy | None = None,
        tool_retry: RetryPolicy | None = None,
    ) -> None:
        self.wrapped = agent
        self.durability: TreadleDurability[AgentDepsT] = TreadleDurability(
            name=name, model_retry=model_retry, tool_retry=tool_retry
        )

    async def run(
        self, ctx: WorkflowContext, user_prompt: str | Sequence[Any] | None = None, **kwargs: Any
    ) -> AgentRunResult[Any]:
        with running_in(ctx):
            capabilities = [*kwargs.pop("capabilities", ()), self.durability]
            return await self.wrapped.run(user_prompt, capabilities=capabilities, **kwargs)
