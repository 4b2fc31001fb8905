"""An in-process workflow registry built from definitions.

One id may be registered under several versions (a rolling deploy ships the old
code beside the new): new runs start under the *newest* version, and a run resumes
under the version pinned when it started (``get_workflow_version``). Versions
compare naturally: ``"10"`` is newer than ``"9"``, ``"2.1"`` newer than ``"2"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import DefinitionError


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order of version strings: digit runs compare as numbers."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", version)
        if part
    )


class Registry:
    """Maps workflow id (and version) to definition; registering one id and version
    twice with different definitions is a definition error."""

    def __init__(self, workflows: Iterable[WorkflowDefinition] = ()) -> None:
        self._versions: dict[str, dict[str, WorkflowDefinition]] = {}
        for wf in workflows:
            self.register(wf)

    def register(self, workflow: WorkflowDefinition) -> None:
        if not isinstance(workflow, WorkflowDefinition):
            raise DefinitionError(f"{workflow!r} is not a built workflow definition")
        versions = self._versions.setdefault(workflow.id, {})
        known = versions.get(workflow.version)
        if known is not None and known is not workflow:
            raise DefinitionError(
                f"workflow id {workflow.id!r} version {workflow.version!r} is registered twice"
            )
        versions[workflow.version] = workflow

    def unregister(self, workflow_id: str, version: str | None = None) -> None:
        """Forget one version of a workflow, or all of them (a deploy that drops code)."""
        versions = self._versions.get(workflow_id, {})
        if version is None:
            versions.clear()
        else:
            versions.pop(version, None)
        if not versions:
            self._versions.pop(workflow_id, None)

    def get_workflow(self, workflow_id: str) -> WorkflowDefinition | None:
        """The newest registered version: what a new run starts under."""
        versions = self._versions.get(workflow_id)
        if not versions:
            return None
        return versions[max(versions, key=version_key)]

    def get_workflow_version(self, workflow_id: str, version: str) -> WorkflowDefinition | None:
        """Exactly ``version`` of the workflow, if it is registered."""
        return self._versions.get(workflow_id, {}).get(version)

    def versions(self, workflow_id: str) -> list[str]:
        """The registered versions of a workflow, oldest first."""
        return sorted(self._versions.get(workflow_id, {}), key=version_key)

    def __iter__(self) -> Iterator[WorkflowDefinition]:
        """Every registered definition, each version of an id (oldest first)."""
        for workflow_id in self._versions:
            for version in self.versions(workflow_id):
                yield self._versions[workflow_id][version]

    def ids(self) -> list[str]:
        return sorted(self._versions)


def remote_stages(registry: object) -> dict[str, tuple[str, ...]]:
    """Queue -> the remote stages (``define_stage(remote=True)``) on it, over every
    definition of ``registry`` (anything iterable over definitions; others: none known)."""
    if not isinstance(registry, Iterable):
        return {}
    found: dict[str, dict[str, None]] = {}
    for wf in registry:
        if not isinstance(wf, WorkflowDefinition):
            continue
        for stage_id, stage in wf.stages.items():
            if stage.remote:
                found.setdefault(wf.queue_of(stage_id), {})[stage_id] = None
    return {queue: tuple(ids) for queue, ids in found.items()}


def refuse_remote_queues(registry: object, queues: Iterable[str], where: str) -> None:
    """``DefinitionError`` when an in-process worker would serve a queue of remote stages:
    it would lease jobs it must not run (``job.execute`` refuses remote stages)."""
    remote = remote_stages(registry)
    for queue in queues:
        if queue in remote:
            raise DefinitionError(
                f"{where}: queue {queue!r} holds remote stages ({', '.join(remote[queue])}), "
                "which only remote workers run over HTTP (docs/remote-workers.md); "
                "serve other queues"
            )
