"""The WorkflowRegistry port: look up definitions by id.

``get_workflow(id)`` returns the version new runs start under. A registry that holds
several versions of one id may also offer ``get_workflow_version(id, version)``
(``treadle.kernel.Registry`` does); the kernel then resumes each run under the version
it was started with, and otherwise under ``get_workflow(id)``.
"""

from __future__ import annotations

from typing import Protocol

from treadle.kernel.definitions import WorkflowDefinition


class WorkflowRegistry(Protocol):
    def get_workflow(self, workflow_id: str) -> WorkflowDefinition | None: ...
