"""Durable code workflows (DESIGN §3.2): ``@workflow``, ``WorkflowContext`` and the
journal model they replay. See ``docs/code-workflows.md``."""

from treadle.kernel.workflows.compensation import Saga
from treadle.kernel.workflows.context import StepInfo, WorkflowContext
from treadle.kernel.workflows.definition import (
    WORKFLOW_STAGE_ID,
    CodeWorkflowDefinition,
    workflow,
)
from treadle.kernel.workflows.model import (
    ForkResult,
    InboxMessage,
    JournalEntry,
    JournalStatus,
    Timer,
)

__all__ = [
    "WORKFLOW_STAGE_ID",
    "CodeWorkflowDefinition",
    "ForkResult",
    "InboxMessage",
    "JournalEntry",
    "JournalStatus",
    "Saga",
    "StepInfo",
    "Timer",
    "WorkflowContext",
    "workflow",
]
