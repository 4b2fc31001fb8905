"""An in-process workflow registry built from definitions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import DefinitionError


class Registry:
    """Maps workflow id to definition; duplicate ids are a definition error."""

    def __init__(self, workflows: Iterable[WorkflowDefinition] = ()) -> None:
        self._workflows: dict[str, WorkflowDefinition] = {}
        for wf in workflows:
            self.register(wf)

    def register(self, workflow: WorkflowDefinition) -> None:
        if not isinstance(workflow, WorkflowDefinition):
            raise DefinitionError(f"{workflow!r} is not a built workflow definition")
        if workflow.id in self._workflows and self._workflows[workflow.id] is not workflow:
            raise DefinitionError(f"workflow id {workflow.id!r} is registered twice")
        self._workflows[workflow.id] = workflow

    def get_workflow(self, workflow_id: str) -> WorkflowDefinition | None:
        return self._workflows.get(workflow_id)

    def __iter__(self) -> Iterator[WorkflowDefinition]:
        return iter(self._workflows.values())

    def ids(self) -> list[str]:
        return sorted(self._workflows)
