"""Public names are pinned: adding or removing one is a deliberate API change."""

from __future__ import annotations

import importlib

import pytest

EXPECTED: dict[str, set[str]] = {
    "treadle": {
        "ChildWorkflowFailedError",
        "Engine",
        "Failed",
        "Kernel",
        "NonRetryableError",
        "NotReady",
        "PayloadMissingError",
        "Ready",
        "RetryPolicy",
        "Run",
        "RunStatus",
        "StageContext",
        "StageRun",
        "StageStatus",
        "StepFailedError",
        "Suspend",
        "TreadleError",
        "TreadleValidationError",
        "WorkflowBuilder",
        "WorkflowContext",
        "WorkflowDefinition",
        "__version__",
        "create_kernel",
        "define_batch_stage",
        "define_stage",
        "migrate",
        "workflow",
    },
    "treadle.ports": {
        "BlobStore",
        "Clock",
        "EventSink",
        "IdGenerator",
        "JobTransport",
        "KernelPlugin",
        "Persistence",
        "Scheduler",
        "Transaction",
        "WorkflowRegistry",
    },
    "treadle.testing": {
        "Chaos",
        "ChaosPersistence",
        "CollectingEventSink",
        "FakeClock",
        "InMemoryBlobStore",
        "InMemoryJobTransport",
        "InMemoryPersistence",
        "InMemoryScheduler",
        "RunHandle",
        "StageMock",
        "StepMock",
        "TestEngine",
        "with_chaos",
    },
    "treadle.adapters.memory": {
        "CollectingEventSink",
        "InMemoryBlobStore",
        "InMemoryJobTransport",
        "InMemoryPersistence",
        "InMemoryScheduler",
        "InMemoryTransaction",
    },
}


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_all_is_pinned(module_name: str) -> None:
    """Each package's ``__all__`` is exactly the pinned set, and every name resolves."""
    module = importlib.import_module(module_name)
    assert set(module.__all__) == EXPECTED[module_name]
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name} is exported but missing"


def test_kernel_exports_resolve() -> None:
    """Everything ``treadle.kernel`` exports exists (its set grows with the kernel)."""
    kernel = importlib.import_module("treadle.kernel")
    for name in kernel.__all__:
        assert hasattr(kernel, name)
