"""The pure command kernel: definitions, commands, events, handlers and errors.

Imports only the standard library and pydantic; ports are referenced as types only.
"""

from treadle.kernel.commands import COMMAND_TYPES, Command, CommandBase, ResultBase
from treadle.kernel.context import CancellationToken, StageContext
from treadle.kernel.definitions import (
    BatchStageDefinition,
    Failed,
    NotReady,
    Ready,
    StageDefinition,
    Suspend,
    WorkflowBuilder,
    WorkflowDefinition,
    define_batch_stage,
    define_stage,
)
from treadle.kernel.events import Event, EventBase, parse_event
from treadle.kernel.ids import SequentialIds, Uuid7Ids
from treadle.kernel.kernel import Kernel, KernelSettings, create_kernel
from treadle.kernel.model import (
    Annotation,
    Job,
    JobStatus,
    MissingPayload,
    Run,
    RunFilter,
    RunStatus,
    StageRun,
    StageStatus,
)
from treadle.kernel.registry import Registry
from treadle.kernel.retry import RetryPolicy
from treadle.kernel.schedules import Schedule, ScheduleDefinition, define_schedule
from treadle.kernel.workflows import (
    CodeWorkflowDefinition,
    JournalEntry,
    StepInfo,
    WorkflowContext,
    workflow,
)

__all__ = [
    "COMMAND_TYPES",
    "Annotation",
    "BatchStageDefinition",
    "CancellationToken",
    "CodeWorkflowDefinition",
    "Command",
    "CommandBase",
    "Event",
    "EventBase",
    "Failed",
    "Job",
    "JobStatus",
    "JournalEntry",
    "Kernel",
    "KernelSettings",
    "MissingPayload",
    "NotReady",
    "Ready",
    "Registry",
    "ResultBase",
    "RetryPolicy",
    "Run",
    "RunFilter",
    "RunStatus",
    "Schedule",
    "ScheduleDefinition",
    "SequentialIds",
    "StageContext",
    "StageDefinition",
    "StageRun",
    "StageStatus",
    "StepInfo",
    "Suspend",
    "Uuid7Ids",
    "WorkflowBuilder",
    "WorkflowContext",
    "WorkflowDefinition",
    "create_kernel",
    "define_batch_stage",
    "define_schedule",
    "define_stage",
    "parse_event",
    "workflow",
]
