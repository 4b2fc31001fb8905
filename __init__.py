"""Treadle: a durable workflow engine for Python.

``from treadle import define_stage, WorkflowBuilder, StageContext, RetryPolicy`` to
author pipelines; ``await Engine.open(url, workflows=[...])`` to run them on memory,
SQLite or PostgreSQL; ``treadle.testing.TestEngine`` to run them under a virtual clock.
Importing treadle has no side effects: no engines, connections or logging set-up.
The public names load on first use (PEP 562), so importing the package (as the
pytest plugin does before coverage starts) does not import the kernel.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treadle.adapters.sql.migrate import migrate
    from treadle.ai.agents import TreadleAgent, TreadleDurability
    from treadle.ai.batches import AIBatchOutput, define_ai_batch_stage
    from treadle.engine import Engine
    from treadle.kernel import (
        Failed,
        Kernel,
        NotReady,
        Ready,
        RetryPolicy,
        Run,
        RunStatus,
        Schedule,
        ScheduleDefinition,
        StageContext,
        StageRun,
        StageStatus,
        Suspend,
        WorkflowBuilder,
        WorkflowContext,
        WorkflowDefinition,
        create_kernel,
        define_batch_stage,
        define_schedule,
        define_stage,
        workflow,
    )
    from treadle.kernel.ai import AICall, AICostRow, AIRecording, AITotals
    from treadle.kernel.ai_helper import AIConfig, AIResult, with_ai_config
    from treadle.kernel.definitions import stage_ids
    from treadle.kernel.errors import (
        AgentOutsideWorkflowError,
        AIError,
        AIExtraMissingError,
        AIRateLimitedError,
        AIRecordError,
        BodyInterruptedError,
        BudgetExceededError,
        ChildWorkflowFailedError,
        ConcurrencyError,
        ConflictError,
        DefinitionError,
        DuplicateError,
        IdempotencyInProgressError,
        InvalidCommandError,
        InvalidConfigError,
        InvalidInputError,
        InvalidPayloadError,
        InvalidStateError,
        JobNotFoundError,
        NonDeterminismError,
        NonRetryableError,
        NotFoundError,
        NotSupportedError,
        OutputValidationError,
        PayloadMissingError,
        RemoteStageError,
        RunCancelledError,
        RunFailedError,
        RunNotFoundError,
        ScheduleNotFoundError,
        StageError,
        StageNotFoundError,
        StageTimeoutError,
        StepFailedError,
        StepNotFoundError,
        StepTimeoutError,
        StorageError,
        SuspendTimeoutError,
        TransientStorageError,
        TreadleError,
        TreadleValidationError,
        UnknownCommandError,
        VersionMismatchError,
        WaitTimeoutError,
        WorkflowError,
        WorkflowNotFoundError,
    )
    from treadle.runtime.options import InvalidWorkerOptionsError, WorkerOptions

__version__ = "0.1.0"

__all__ = [
    "AIBatchOutput",
    "AICall",
    "AIConfig",
    "AICostRow",
    "AIError",
    "AIExtraMissingError",
    "AIRateLimitedError",
    "AIRecordError",
    "AIRecording",
    "AIResult",
    "AITotals",
    "AgentOutsideWorkflowError",
    "BodyInterruptedError",
    "BudgetExceededError",
    "ChildWorkflowFailedError",
    "ConcurrencyError",
    "ConflictError",
    "DefinitionError",
    "DuplicateError",
    "Engine",
    "Failed",
    "IdempotencyInProgressError",
    "InvalidCommandError",
    "InvalidConfigError",
    "InvalidInputError",
    "InvalidPayloadError",
    "InvalidStateError",
    "InvalidWorkerOptionsError",
    "JobNotFoundError",
    "Kernel",
    "NonDeterminismError",
    "NonRetryableError",
    "NotFoundError",
    "NotReady",
    "NotSupportedError",
    "OutputValidationError",
    "PayloadMissingError",
    "Ready",
    "RemoteStageError",
    "RetryPolicy",
    "Run",
    "RunCancelledError",
    "RunFailedError",
    "RunNotFoundError",
    "RunStatus",
    "Schedule",
    "ScheduleDefinition",
    "ScheduleNotFoundError",
    "StageContext",
    "StageError",
    "StageNotFoundError",
    "StageRun",
    "StageStatus",
    "StageTimeoutError",
    "StepFailedError",
    "StepNotFoundError",
    "StepTimeoutError",
    "StorageError",
    "Suspend",
    "SuspendTimeoutError",
    "TransientStorageError",
    "TreadleAgent",
    "TreadleDurability",
    "TreadleError",
    "TreadleValidationError",
    "UnknownCommandError",
    "VersionMismatchError",
    "WaitTimeoutError",
    "WorkerOptions",
    "WorkflowBuilder",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowError",
    "WorkflowNotFoundError",
    "__version__",
    "create_kernel",
    "define_ai_batch_stage",
    "define_batch_stage",
    "define_schedule",
    "define_stage",
    "migrate",
    "stage_ids",
    "with_ai_config",
    "workflow",
]

_AI_EXTRA = frozenset(
    {"AIBatchOutput", "TreadleAgent", "TreadleDurability", "define_ai_batch_stage"}
)

_ERRORS = frozenset(
    {
        "AIError",
        "AIExtraMissingError",
        "AIRateLimitedError",
        "AIRecordError",
        "AgentOutsideWorkflowError",
        "BudgetExceededError",
        "BodyInterruptedError",
        "ChildWorkflowFailedError",
        "ConcurrencyError",
        "ConflictError",
        "DefinitionError",
        "DuplicateError",
        "IdempotencyInProgressError",
        "InvalidCommandError",
        "InvalidConfigError",
        "InvalidInputError",
        "InvalidPayloadError",
        "InvalidStateError",
        "JobNotFoundError",
        "NonDeterminismError",
        "NonRetryableError",
        "NotFoundError",
        "NotSupportedError",
        "OutputValidationError",
        "PayloadMissingError",
        "RemoteStageError",
        "RunCancelledError",
        "RunFailedError",
        "RunNotFoundError",
        "ScheduleNotFoundError",
        "StageError",
        "StageNotFoundError",
        "StageTimeoutError",
        "StepFailedError",
        "StepNotFoundError",
        "StepTimeoutError",
        "StorageError",
        "SuspendTimeoutError",
        "TransientStorageError",
        "TreadleError",
        "TreadleValidationError",
        "UnknownCommandError",
        "VersionMismatchError",
        "WaitTimeoutError",
        "WorkflowError",
        "WorkflowNotFoundError",
    }
)

_AI = frozenset({"AICall", "AICostRow", "AIRecording", "AITotals"})
_AI_HELPER = frozenset({"AIConfig", "AIResult", "with_ai_config"})


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'treadle' has no attribute {name!r}")
    if name == "Engine":
        module = "treadle.engine"
    elif name == "migrate":  # ``treadle.migrate(url)``: SQLAlchemy loaded on use
        module = "treadle.adapters.sql.migrate"
    elif name in ("WorkerOptions", "InvalidWorkerOptionsError"):
        module = "treadle.runtime.options"
    elif name in _AI_EXTRA:  # the ``ai`` extra: pydantic-ai and the providers' SDKs
        module = "treadle.ai"
    elif name in _AI:
        module = "treadle.kernel.ai"
    elif name in _AI_HELPER:
        module = "treadle.kernel.ai_helper"
    elif name == "stage_ids":
        module = "treadle.kernel.definitions"
    elif name in _ERRORS:
        module = "treadle.kernel.errors"
    else:
        module = "treadle.kernel"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
