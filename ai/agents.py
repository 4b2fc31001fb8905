"""Durable pydantic-ai agents: ``TreadleAgent(agent)`` runs an ``Agent`` inside a code
workflow, each model request and each tool call a journaled step.

Built on pydantic-ai's durable-execution extension point (``pydantic_ai.durable_exec``),
the one its Temporal, DBOS and Prefect integrations use: ``TreadleDurability`` is a
``BaseDurabilityCapability`` whose ``CallableOperationBackend`` runs each of the agent's
durable operations (model request, tool call, tool-argument validation, toolset
discovery) as ``ctx.step`` of the workflow the agent runs in. Values cross the journal as
JSON (``JSON_CODEC``: pydantic-ai's own ``TypeAdapter`` of ``ModelResponse`` and of tool
results), so a replay of the body, on any worker, gets the recorded response back
without calling the model again.

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
from typing import TYPE_CHECKING, Any, Generic

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
from pydantic_ai.tools import AgentDepsT

from treadle.kernel.errors import NonDeterminismError, TreadleError
from treadle.kernel.retry import RetryPolicy
from treadle.kernel.workflows.waits import Interrupt

if TYPE_CHECKING:
    from pydantic_ai.agent import AbstractAgent, AgentRunResult

    from treadle.kernel.workflows.context import WorkflowContext

_CURRENT: contextvars.ContextVar[WorkflowContext | None] = contextvars.ContextVar(
    "treadle_agent_workflow", default=None
)
"""The workflow context of the agent run in progress in this task (``TreadleAgent.run``)."""


class AgentOutsideWorkflowError(TreadleError):
    """A durable operation of a ``TreadleAgent`` was reached outside ``TreadleAgent.run``."""


def _serialization_failure(exc: Exception) -> BaseException:
    from treadle.kernel.errors import OutputValidationError

    return OutputValidationError(f"an agent step returned a value that is not JSON: {exc}")


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
        on_model_response: Callable[[Any, float], None] | None,
    ) -> None:
        super().__init__(
            agent_name=agent_name,
            default_model_id=default_model_id,
            config=RoleBasedOperationConfig(
                model=model_retry, event=None, capability=None, tool=tool_retry
            ),
        )
        self._on_model_response = on_model_response

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
        is_model = isinstance(operation_id, ModelRequestId)
        on_response = self._on_model_response

        async def step():  # type: ignore[no-untyped-def]  # no annotation: journaled as JSON
            started = time.monotonic()
            payload = await body()
            if is_model and on_response is not None:
                on_response(payload, time.monotonic() - started)
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
            on_model_response=None,
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
