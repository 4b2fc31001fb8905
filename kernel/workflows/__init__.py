"""Durable code workflows (DESIGN §3.2): ``@workflow``, ``WorkflowContext`` and the
journal model they replay. See ``docs/code-workflows.md``."""

from treadle.kernel.workflows.context import StepInfo, WorkflowContext
from treadle.kernel.workflows.definition import (
    WORKFLOW_STAGE_ID,
    CodeWorkflowDefinition,
    workflow,
)
from treadle.kernel.workflows.fork import ForkResult
from treadle.kernel.workflows.model import (
    InboxMessage,
    JournalEntry,
    JournalStatus,
    Timer,
)
from treadle.kernel.workflows.saga import Saga

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
