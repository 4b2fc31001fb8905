"""The WorkflowRegistry port: look up definitions by id."""

from __future__ import annotations

from typing import Protocol

from treadle.kernel.definitions import WorkflowDefinition


class WorkflowRegistry(Protocol):
    def get_workflow(self, workflow_id: str) -> WorkflowDefinition | None: ...
