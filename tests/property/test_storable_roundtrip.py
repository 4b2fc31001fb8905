"""Property: any JSON-like value handed to ``start``, ``signal`` or returned as a stage
output or step result either makes a clean round trip or is refused with a
``TreadleValidationError`` naming the field (and nothing is written), on memory, SQLite
and PostgreSQL alike; never another exception, never a value stored differently.

Values come from Hypothesis: text with NUL characters and lone surrogates, floats with
NaN and infinity, integers past 64 bits, and nesting around ``MAX_DEPTH``. Whether a
value is storable is decided here by an oracle written apart from ``kernel.limits``.
"Round trip" compares JSON values, numbers by value: the SQL adapters read some floats
back as ints (``1e16`` comes back as ``10000000000000000``), a JSON number either way.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treadle import Engine, RunStatus, WorkflowBuilder, WorkflowContext, define_stage, workflow
from treadle.kernel import commands as c
from treadle.kernel.errors import TreadleValidationError
from treadle.testing import FakeClock

LIMIT = 128
"""``kernel.limits.MAX_DEPTH``, restated: the oracle does not read the kernel's rules."""
WORKER = "property"
EXAMPLES = {"memory": 60, "sqlite": 15, "postgres": 15}
"""Examples per property and backend: the SQL ones cost a dozen commits each, and the
whole module stays near half a minute on two busy cores."""


def _settings(backend: Backend) -> settings:
    return settings(
        max_examples=EXAMPLES[backend.name],
        deadline=None,
        database=None,  # no .hypothesis directory in the repository
        suppress_health_check=[HealthCheck.too_slow],
    )


# -- the oracle ---------------------------------------------------------------------------


def _text_ok(text: str) -> bool:
    return "\x00" not in text and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def storable(value: Any, depth: int = 0) -> bool:
    """Whether every backend can store ``value`` (DESIGN: what one can't, none accepts)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value <= 2**63 - 1
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return _text_ok(value)
    if isinstance(value, list):
        return depth < LIMIT and all(storable(item, depth + 1) for item in value)
    assert isinstance(value, dict)
    return depth < LIMIT and all(
        _text_ok(key) and storable(item, depth + 1) for key, item in value.items()
    )


def same(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (an int and a float may stand for one number),
    booleans never equal to numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b) if isinstance(a, float) or isinstance(b, float) else a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# -- the values ---------------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates included
TEXT = st.text(ANY_CHAR, max_size=12) | st.sampled_from(["", "a\x00b", "\ud800", "caf\u00e9"])
NUMBERS = (
    st.integers()
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30])
    | st.floats()
)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for index in range(levels):
        value = [value] if index % 2 else {"k": value}
    return value


JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
VALUES = JSON | st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, 1_000]).map(_nested)

# -- the workflows ------------------------------------------------------------------------

HANDED: dict[str, Any] = {}
"""The value the next stage or step returns (a global: Hypothesis draws it per example)."""


@define_stage(id="echo", input=Any, output=Any)
async def echo(ctx: Any) -> Any:
    return ctx.input


@define_stage(id="emit", input="none", output=Any)
async def emit(ctx: Any) -> Any:
    return HANDED["value"]


def _handed() -> Any:
    return HANDED["value"]


@workflow(id="relay", input=Any, output=Any)
async def relay(ctx: WorkflowContext, data: Any) -> Any:
    return await ctx.wait_for_signal("data")


@workflow(id="stepper", input=Any, output=Any)
async def stepper(ctx: WorkflowContext, data: Any) -> Any:
    return await ctx.step("hand", _handed)


WORKFLOWS = [
    WorkflowBuilder("echo", input=Any).pipe(echo).build(),
    WorkflowBuilder("emit", input=Any).pipe(emit).build(),
    relay,
    stepper,
]


class Backend:
    """One engine on one backend for a whole test, driven by hand on its own loop (no
    worker: each example runs its commands in order, so it costs milliseconds)."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.runs = 0
        """Runs started so far: a refused start must leave exactly these."""
        self.runner = asyncio.Runner()
        self.clock = FakeClock()
        self.engine = self.run(Engine.open(url, workflows=WORKFLOWS, clock=self.clock))

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def close(self) -> None:
        self.run(self.engine.aclose())
        self.runner.close()

    def check(self, prop: Callable[[Any], Any]) -> None:
        """Run the async property ``prop(value)`` for values Hypothesis draws."""

        @_settings(self)
        @given(value=VALUES)
        def run_one(value: Any) -> None:
            self.run(prop(value))

        run_one()

    async def start(self, workflow_id: str, value: Any) -> Any:
        handle = await self.engine.start(workflow_id, value)
        self.runs += 1
        return handle

    async def drive(self, run_id: str, *statuses: RunStatus) -> Any:
        """Claim and execute jobs until the run reaches one of ``statuses``."""
        kernel = self.engine.kernel
        for _ in range(20):
            run = await self.engine.get_run(run_id)
            if run.status in statuses:
                return run
            await kernel.dispatch(c.RunClaimPending(worker_id=WORKER))
            for job in await kernel.deps.job_transport.dequeue(WORKER, self.clock.now(), limit=10):
                await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id=WORKER))
        raise AssertionError(f"run {run_id} never reached {statuses}: {run.status} {run.error}")

    async def nothing_written(self) -> None:
        assert len(await self.engine.list(limit=10_000)) == self.runs


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        url = "memory://"
    else:
        url = str(request.getfixturevalue(f"treadle_{request.param}_url"))
    opened = Backend(request.param, url)
    yield opened
    opened.close()


def refused(error: TreadleValidationError, field: str) -> None:
    """A refusal names a path under ``field``, and its message is storable text."""
    assert error.errors, error
    assert error.errors[0][0].startswith(field), error
    assert _text_ok(str(error))


# -- the properties -----------------------------------------------------------------------


def test_start_input_round_trips_or_is_refused(backend: Backend) -> None:
    """start(input) -> stage output -> run output: the same value, or a named refusal
    with no run written."""

    async def prop(value: Any) -> None:
        if not storable(value):
            with pytest.raises(TreadleValidationError) as info:
                await backend.start("echo", value)
            refused(info.value, "input")
            await backend.nothing_written()
            return
        handle = await backend.start("echo", value)
        run = await backend.drive(handle.run_id, RunStatus.COMPLETED)
        assert same(run.input, value)
        assert same(run.stages[0].output, value)
        assert same(run.output, value)

    backend.check(prop)


def test_signal_payload_round_trips_or_is_refused(backend: Backend) -> None:
    """signal(payload) to a waiting body, which returns it: the same value, or a named
    refusal with nothing in the inbox and no event."""

    async def prop(value: Any) -> None:
        handle = await backend.start("relay", None)
        await backend.drive(handle.run_id, RunStatus.SUSPENDED)
        if not storable(value):
            with pytest.raises(TreadleValidationError) as info:
                await backend.engine.signal(handle.run_id, "data", value)
            refused(info.value, "payload")
            assert await backend.engine.kernel.reads.inbox(handle.run_id) == []
            events = [e.type async for e in backend.engine.events(handle.run_id)]  # type: ignore[attr-defined]
            assert "signal:received" not in events
            await backend.engine.cancel(handle.run_id)
            return
        await backend.engine.signal(handle.run_id, "data", value)
        run = await backend.drive(handle.run_id, RunStatus.COMPLETED)
        assert same(run.output, value)

    backend.check(prop)


def _returned(backend: Backend, workflow_id: str, field: str, stored: Callable[[Any], Any]) -> None:
    """Property: what a stage or step of ``workflow_id`` returns is stored as it was, or
    fails it at once naming ``field``."""

    async def prop(value: Any) -> None:
        HANDED["value"] = value
        handle = await backend.start(workflow_id, {})
        run = await backend.drive(handle.run_id, RunStatus.COMPLETED, RunStatus.FAILED)
        if storable(value):
            assert run.status is RunStatus.COMPLETED, run.error
            assert same(await stored(run), value)
            assert same(run.output, value)
        else:
            assert run.status is RunStatus.FAILED
            assert "OutputValidationError" in (run.error or ""), run.error
            assert f"{field}" in (run.error or "")
            assert _text_ok(run.error or "")
            assert run.stages[0].attempt == 1  # refused at once, never retried

    backend.check(prop)


def test_stage_output_round_trips_or_fails_the_stage(backend: Backend) -> None:
    """A pipeline stage's output: stored and read back as it was, or the stage fails
    once, naming the output field (nothing half-stored)."""

    async def output(run: Any) -> Any:
        return run.stages[0].output

    _returned(backend, "emit", "output", output)


def test_step_result_round_trips_or_fails_the_step(backend: Backend) -> None:
    """A code-workflow step's result: journaled and returned as it was, or the step fails
    once, naming the result field, and the run fails with it."""

    async def result(run: Any) -> Any:
        (entry,) = await backend.engine.journal(run.id)
        return entry.result

    _returned(backend, "stepper", "result", result)
