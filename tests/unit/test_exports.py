"""Public names are pinned: adding or removing one is a deliberate API change."""

from __future__ import annotations

import importlib
import inspect

import pytest

from treadle.kernel import errors


def _public_errors() -> set[str]:
    """Every public error class ``kernel/errors.py`` defines: the whole tree under
    ``TreadleError``, which any documented flow may raise."""
    return {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value)
        and issubclass(value, errors.TreadleError)
        and value.__module__ == errors.__name__
        and not name.startswith("_")
    }


EXPECTED: dict[str, set[str]] = {
    "treadle": {
        "AIBatchOutput",
        "AICall",
        "AIConfig",
        "AICostRow",
        "AIRecording",
        "AIResult",
        "AITotals",
        "with_ai_config",
        "stage_ids",
        "Engine",
        "Schedule",
        "ScheduleDefinition",
        "ScheduleNotFoundError",
        "define_schedule",
        "Failed",
        "InvalidWorkerOptionsError",
        "Kernel",
        "NotReady",
        "PayloadMissingError",
        "RemoteStageError",
        "Ready",
        "RetryPolicy",
        "Run",
        "RunStatus",
        "StageContext",
        "StageRun",
        "StageStatus",
        "Suspend",
        "WorkflowBuilder",
        "WorkflowContext",
        "WorkflowDefinition",
        "WorkerOptions",
        "__version__",
        "create_kernel",
        "define_ai_batch_stage",
        "define_batch_stage",
        "define_stage",
        "migrate",
        "TreadleAgent",
        "TreadleDurability",
        "workflow",
    }
    | _public_errors(),
    "treadle.ai": {
        "AIBatchItem",
        "AIBatchOutput",
        "AIBatchPrompt",
        "TreadleAgent",
        "TreadleDurability",
        "batch_price",
        "current_workflow",
        "define_ai_batch_stage",
        "running_in",
    },
    "treadle.ports": {
        "AICallLogger",
        "AttemptSpan",
        "BlobRetention",
        "BlobStore",
        "Clock",
        "CronCalendar",
        "ScheduleStore",
        "EventSink",
        "IdGenerator",
        "JobRetention",
        "JobTransport",
        "KernelPlugin",
        "Persistence",
        "RetentionStore",
        "Scheduler",
        "Telemetry",
        "Transaction",
        "WorkerRegistry",
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
        "SimulatedCrash",
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
        "InMemoryWorkerRegistry",
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


def test_every_public_error_is_exported_from_treadle() -> None:
    """``from treadle import X`` works for every error class in kernel/errors.py (a new
    error joins ``treadle.__all__`` with its class), and is that very class."""
    import treadle

    public = _public_errors()
    assert {"NonDeterminismError", "WaitTimeoutError", "TreadleError"} <= public
    missing = sorted(public - set(treadle.__all__))
    assert missing == [], f"errors missing from treadle.__all__: {missing}"
    for name in sorted(public):
        assert getattr(treadle, name) is getattr(errors, name)
