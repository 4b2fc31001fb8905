"""Version pinning of code workflows (issue 5, requirement 9): a run resumes only under
the version it started with. Under another version the body does not run: the run is
blocked (SUSPENDED, ``VersionMismatchError`` in ``error``, journal intact) and resumes
by itself once a worker registering the pinned version polls it. On memory, a SQLite
file and PostgreSQL; each "deploy" is a new ``Engine`` over the same storage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, RunStatus, WorkflowContext, workflow
from treadle.kernel import create_kernel
from treadle.kernel import events as ev
from treadle.kernel.definitions import WorkflowDefinition
from treadle.kernel.errors import DefinitionError, VersionMismatchError
from treadle.kernel.model import StageStatus
from treadle.kernel.registry import Registry
from treadle.testing import FakeClock
from treadle.tests.scenario.helpers import WAIT, run_events, until, worker


class Order(BaseModel):
    n: int


RAN: list[str] = []


async def record(label: str) -> str:
    RAN.append(label)
    return label


@workflow(id="deploy", input=Order, output=str, version="1")
async def deploy_v1(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step("a", record, "v1:a")
    await ctx.wait_for_signal("go")
    await ctx.sleep(timedelta(hours=1))
    return str(await ctx.step("b", record, "v1:b"))


@workflow(id="deploy", input=Order, output=str, version="2")
async def deploy_v2(ctx: WorkflowContext, order: Order) -> str:
    """Reaches other calls than v1: replaying a v1 journal would not be deterministic."""
    await ctx.step("a2", record, "v2:a2")
    return "v2"


class Deployments:
    """Opens one ``Engine`` per deploy over the same storage. ``memory://`` storage lives
    in the first engine, so later deploys are kernels wired to its ports."""

    def __init__(self, url: str, clock: FakeClock) -> None:
        self.url = url
        self.clock = clock
        self._base: Engine | None = None

    async def open(self, workflows: Sequence[WorkflowDefinition]) -> Engine:
        if self.url != "memory://":
            return await Engine.open(self.url, workflows=workflows, clock=self.clock)
        if self._base is None:
            self._base = await Engine.open(self.url, clock=self.clock)
        d = self._base.kernel.deps
        kernel = create_kernel(
            persistence=d.persistence,
            job_transport=d.job_transport,
            blob_store=d.blob_store,
            event_sink=d.event_sink,
            scheduler=d.scheduler,
            clock=d.clock,
            registry=workflows,
        )
        return Engine(kernel)

    async def aclose(self) -> None:
        if self._base is not None:
            await self._base.aclose()


@pytest.fixture
async def deployments(url: str) -> AsyncIterator[Deployments]:
    RAN.clear()
    opened = Deployments(url, FakeClock())
    try:
        yield opened
    finally:
        await opened.aclose()


async def _until(engine: Engine, run_id: str, check: Any) -> None:
    """Poll the run (and its events) until ``check(run, events)`` holds."""

    async def holds() -> bool:
        return bool(check(await engine.get_run(run_id), await run_events(engine, run_id)))

    await until(holds)


def _mismatches(events: list[ev.EventBase]) -> list[ev.VersionMismatched]:
    return [e for e in events if isinstance(e, ev.VersionMismatched)]


async def test_resuming_under_another_version_blocks_the_run_until_the_pinned_one_returns(
    deployments: Deployments,
) -> None:
    """Started under v1 and waiting; a deploy of only v2 delivers a signal: the body does
    not run, the run is SUSPENDED (not failed) with the VersionMismatchError and its
    journal as v1 left it, and is re-checked without more events. A deploy registering
    v1 and v2 resumes it under v1 by itself; new runs start under v2."""
    clock = deployments.clock
    v1 = await deployments.open([deploy_v1])
    async with worker(v1):
        handle = await v1.start("deploy", {"n": 1})
        await _until(v1, handle.run_id, lambda run, _: run.status is RunStatus.SUSPENDED)
    assert (await v1.get_run(handle.run_id)).workflow_version == "1"
    await v1.aclose()

    v2 = await deployments.open([deploy_v2])
    async with worker(v2):
        await v2.signal(handle.run_id, "go", None)
        await _until(v2, handle.run_id, lambda run, events: _mismatches(events))
        blocked = await v2.get_run(handle.run_id)
        assert blocked.status is RunStatus.SUSPENDED
        assert blocked.error is not None
        assert blocked.error.startswith("VersionMismatchError: ")
        assert "pinned to version '1'" in blocked.error
        assert "registers version '2' only" in blocked.error
        (stage,) = blocked.stages
        assert stage.status is StageStatus.SUSPENDED
        assert stage.error == blocked.error
        assert stage.next_poll_at == clock.now() + timedelta(seconds=60)
        (mismatch,) = _mismatches(await run_events(v2, handle.run_id))
        assert (mismatch.pinned_version, mismatch.registered_version) == ("1", "2")
        journal = [(e.kind, e.name, e.status.value) for e in await v2.journal(handle.run_id)]
        assert journal == [("step", "a", "COMPLETED"), ("signal", "signal:go", "COMPLETED")]
        assert RAN == ["v1:a"]  # v2's body never ran
        clock.advance(timedelta(seconds=61))  # the re-check: still blocked, no new event
        await _until(
            v2,
            handle.run_id,
            lambda run, _: run.stages[0].next_poll_at == clock.now() + timedelta(seconds=60),
        )
    assert len(_mismatches(await run_events(v2, handle.run_id))) == 1
    assert (await v2.get_run(handle.run_id)).status is RunStatus.SUSPENDED
    await v2.aclose()

    both = await deployments.open([deploy_v1, deploy_v2])
    async with worker(both):
        clock.advance(timedelta(seconds=61))  # the next re-check finds v1 registered
        await _until(
            both,
            handle.run_id,
            lambda run, _: run.status is RunStatus.SUSPENDED and run.error is None,
        )  # resumed, replayed, and now in v1's one-hour sleep
        clock.advance(timedelta(hours=1))
        assert await both.handle(handle.run_id).result(timeout=WAIT) == "v1:b"
        fresh = await both.start("deploy", {"n": 2})
        assert await fresh.result(timeout=WAIT) == "v2"
    assert (await both.get_run(fresh.run_id)).workflow_version == "2"
    assert RAN == ["v1:a", "v1:b", "v2:a2"]
    done = await both.get_run(handle.run_id)
    assert (done.status, done.error, done.workflow_version) == (RunStatus.COMPLETED, None, "1")
    await both.aclose()


@workflow(id="napper", input=Order, output=str, version="1")
async def napper_v1(ctx: WorkflowContext, order: Order) -> str:
    await ctx.sleep(timedelta(hours=1))
    return str(await ctx.step("after", record, "v1:after"))


@workflow(id="napper", input=Order, output=str, version="2")
async def napper_v2(ctx: WorkflowContext, order: Order) -> str:
    return str(await ctx.step("other", record, "v2:other"))


async def test_a_due_timer_under_another_version_is_not_fired(
    deployments: Deployments,
) -> None:
    """The maintenance tick of a deploy without the pinned version blocks a sleeping run
    instead of firing its timer (the journal still shows the sleep waiting); after the
    pinned version is deployed again the body replays past the sleep and completes."""
    clock = deployments.clock
    v1 = await deployments.open([napper_v1])
    async with worker(v1):
        handle = await v1.start("napper", {"n": 1})
        await _until(v1, handle.run_id, lambda run, _: run.status is RunStatus.SUSPENDED)
    await v1.aclose()

    v2 = await deployments.open([napper_v2])
    async with worker(v2):
        clock.advance(timedelta(hours=1))
        await _until(v2, handle.run_id, lambda run, _: run.error is not None)
    run = await v2.get_run(handle.run_id)
    assert run.status is RunStatus.SUSPENDED
    assert "VersionMismatchError" in str(run.error)
    events = await run_events(v2, handle.run_id)
    assert not any(isinstance(e, ev.TimerFired) for e in events)
    assert [type(e) for e in events][-1] is ev.VersionMismatched  # not a second suspend
    journal = await v2.journal(handle.run_id)
    assert [(e.kind, e.status.value) for e in journal] == [("sleep", "WAITING")]
    assert RAN == []
    await v2.aclose()

    again = await deployments.open([napper_v1])
    async with worker(again):
        clock.advance(timedelta(seconds=61))
        assert await again.handle(handle.run_id).result(timeout=WAIT) == "v1:after"
    assert RAN == ["v1:after"]
    await again.aclose()


def test_registry_holds_several_versions_and_starts_the_newest() -> None:
    """One id may be registered under several versions; ``get_workflow`` is the newest in
    natural order ("10" after "9"), each version stays reachable, and registering one id
    and version twice with different definitions is refused."""

    def build(version: str) -> WorkflowDefinition:
        @workflow(id="multi", input=Order, version=version)
        async def body(ctx: WorkflowContext, order: Order) -> None:
            return None

        return body

    nine, ten, two = build("9"), build("10"), build("2")
    registry = Registry([nine, ten, two])
    assert registry.get_workflow("multi") is ten
    assert registry.get_workflow_version("multi", "9") is nine
    assert registry.get_workflow_version("multi", "3") is None
    assert registry.versions("multi") == ["2", "9", "10"]
    assert list(registry) == [two, nine, ten]
    assert registry.ids() == ["multi"]
    with pytest.raises(DefinitionError, match="version '9' is registered twice"):
        registry.register(build("9"))


def test_version_mismatch_error_is_a_workflow_error() -> None:
    """``VersionMismatchError`` sits under ``WorkflowError`` with a stable code."""
    from treadle.kernel.errors import WorkflowError

    assert issubclass(VersionMismatchError, WorkflowError)
    assert VersionMismatchError("x").code == "VersionMismatchError"


async def test_the_recheck_interval_is_a_kernel_setting() -> None:
    """``KernelSettings.version_recheck_interval`` sets when a blocked run is looked at
    again; each re-check under the wrong version only moves that time on."""
    from treadle.kernel import KernelSettings
    from treadle.testing import TestEngine

    RAN.clear()
    te = TestEngine(
        [napper_v1], settings=KernelSettings(version_recheck_interval=timedelta(seconds=5))
    )
    handle = await te.start("napper", {"n": 1})
    await te.run_until_idle()
    te.registry.unregister("napper")
    te.registry.register(napper_v2)  # a deploy of v2 only, over the same storage
    await te.advance_time(timedelta(hours=1))
    blocked = await te.get_run(handle.run_id)
    assert blocked.status is RunStatus.SUSPENDED
    assert blocked.stages[0].next_poll_at == te.clock.now() + timedelta(seconds=5)
    await te.advance_time(timedelta(seconds=5))
    again = await te.get_run(handle.run_id)
    assert again.stages[0].next_poll_at == te.clock.now() + timedelta(seconds=5)
    assert sum(isinstance(e, ev.VersionMismatched) for e in te.events) == 1
    te.registry.register(napper_v1)  # v1 and v2 side by side
    await te.advance_time(timedelta(seconds=5))
    assert await handle.result() == "v1:after"
    assert RAN == ["v1:after"]


UNDONE: list[str] = []


def undo(what: str) -> None:
    UNDONE.append(what)


@workflow(id="trip", input=Order, output=str, version="1")
async def trip_v1(ctx: WorkflowContext, order: Order) -> str:
    saga = ctx.saga()
    await ctx.step("book", record, "v1:book")
    saga.add("unbook", undo, "v1:book")
    await ctx.wait_for_signal("go")
    return "v1"


@workflow(id="trip", input=Order, output=str, version="2")
async def trip_v2(ctx: WorkflowContext, order: Order) -> str:
    saga = ctx.saga()
    saga.add("other", undo, "v2:other")
    return "v2"


async def test_a_cancelled_run_compensates_only_under_its_pinned_version() -> None:
    """Cancelling a v1 run with compensations on a deploy of only v2 leaves it CANCELLED
    (never revived as SUSPENDED) with the mismatch noted in its error, runs no
    compensation, and retries after the re-check interval: under v1 they run once."""
    from treadle.testing import TestEngine

    RAN.clear()
    UNDONE.clear()
    te = TestEngine([trip_v1])
    handle = await te.start("trip", {"n": 1})
    await te.run_until_idle()
    te.registry.unregister("trip")
    te.registry.register(trip_v2)
    assert await te.cancel(handle.run_id, reason="changed plans")
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error is not None
    assert run.error.startswith("changed plans; VersionMismatchError: ")
    assert UNDONE == []
    await te.advance_time(timedelta(seconds=60))  # re-checked, still the wrong version
    assert (await te.get_run(handle.run_id)).error == run.error
    assert sum(isinstance(e, ev.VersionMismatched) for e in te.events) == 1
    te.registry.register(trip_v1)
    await te.advance_time(timedelta(seconds=60))
    assert UNDONE == ["v1:book"]
    done = await te.get_run(handle.run_id)
    assert done.status is RunStatus.CANCELLED
    assert done.error is not None
    assert done.error.endswith("compensated unbook")
