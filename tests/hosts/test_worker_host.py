"""The worker process host in-process (signals are exercised with real processes in
tests/reliability): serving and draining, forced stop, exit codes, one-line errors,
logging installed only by ``main``, the ``--app`` loader, and the stage thread pool."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.engine import RunHandle
from treadle.hosts.app import AppLoadError, load_workflows
from treadle.hosts.worker import EXIT_BAD_CONFIG, EXIT_STARTUP_FAILED, WorkerHost, main
from treadle.kernel.model import RunStatus
from treadle.runtime.threads import StageThreadPool


class Num(BaseModel):
    n: int


GATE: dict[str, asyncio.Event] = {}


@define_stage(id="add", input=Num, output=Num)
def add(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n + 1)  # a sync stage: runs in the host's thread pool


@define_stage(id="wait", input=Num, output=Num)
async def wait(ctx):  # type: ignore[no-untyped-def]
    GATE["entered"].set()
    await GATE["open"].wait()
    return ctx.input


ADD = WorkflowBuilder("add-wf", input=Num).pipe(add).build()
WAIT = WorkflowBuilder("wait-wf", input=Num).pipe(wait).build()


@pytest.fixture
def db(tmp_path: Path) -> str:
    GATE.clear()
    GATE.update(entered=asyncio.Event(), open=asyncio.Event())
    return f"sqlite:///{tmp_path / 'worker.db'}"


def _host(db: str, **options: float) -> WorkerHost:
    return WorkerHost(
        [ADD, WAIT], db=db, orchestration_interval=0.05, job_poll_interval=0.02, **options
    )


async def test_serve_runs_work_and_drains_on_stop(db: str) -> None:
    """A served host completes a run started elsewhere; request_stop drains and the exit
    code is 0."""
    async with await Engine.open(db, workflows=[ADD, WAIT]) as engine:
        handle = await engine.start("add-wf", {"n": 1})
        host = _host(db)
        serving = asyncio.create_task(host.serve())
        assert await handle.result(timeout=10) == {"n": 2}
        host.request_stop()
        assert await asyncio.wait_for(serving, 10) == 0
        assert host.worker is not None
        assert not host.worker.running


async def test_second_stop_forces_the_exit_and_releases_the_job(db: str) -> None:
    """A second request_stop during a long drain returns 128 + signum at once, with the
    running job released for another worker."""
    async with await Engine.open(db, workflows=[ADD, WAIT]) as engine:
        handle = await engine.start("wait-wf", {"n": 1})
        host = _host(db, drain_timeout=30.0)
        serving = asyncio.create_task(host.serve())
        await asyncio.wait_for(GATE["entered"].wait(), 10)
        host.request_stop(15)
        await asyncio.sleep(0)  # the drain begins
        host.request_stop(15)
        assert await asyncio.wait_for(serving, 5) == 128 + 15
        run = await RunHandle(engine, handle.run_id).get()
        assert run.status is RunStatus.RUNNING
        assert [s.status.value for s in run.stages] == ["PENDING"]


def test_main_rejects_a_bad_app_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An --app that names nothing is exit code 2 with one line on stderr, no traceback."""
    code = main(app="no_such_module_xyz:workflows", db="memory://")
    assert code == EXIT_BAD_CONFIG
    err = capsys.readouterr().err.strip()
    assert err == (
        "treadle worker: cannot import module 'no_such_module_xyz' "
        "(from --app 'no_such_module_xyz:workflows'): no such module"
    )


def test_main_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    """Out-of-range options are exit code 2, naming the option."""
    assert main(app=None, db="memory://", concurrency=0) == EXIT_BAD_CONFIG
    assert "concurrency must be a positive integer" in capsys.readouterr().err
    assert main(app=None, db="memory://", drain_timeout=-1) == EXIT_BAD_CONFIG
    assert "drain_timeout must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option",
    ["drain_timeout", "orchestration_interval", "job_poll_interval", "stale_lease_threshold"],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300])
def test_durations_that_are_not_finite_or_too_long_are_refused(option: str, value: float) -> None:
    """inf, nan or 1e300 seconds is a ValueError naming the option (exit code 2 from
    main), not a worker whose every tick crashes with an OverflowError."""
    with pytest.raises(ValueError, match=f"^{option} must be a finite number of seconds up to"):
        WorkerHost([ADD], db="memory://", **{option: value})


def test_the_cli_and_the_worker_host_bound_durations_alike() -> None:
    """`treadle worker`'s duration options stop where WorkerHost does."""
    from treadle.hosts.cli.common import MAX_SECONDS as CLI_MAX
    from treadle.hosts.worker import MAX_SECONDS

    assert CLI_MAX == MAX_SECONDS
    WorkerHost([], db="memory://", stale_lease_threshold=MAX_SECONDS, drain_timeout=MAX_SECONDS)


def test_main_reports_an_unopenable_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that cannot be opened is exit code 1 with one line naming it, and the
    logging main installed is removed again."""
    before = list(logging.getLogger("treadle").handlers)
    code = main(app=None, db=f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    assert code == EXIT_STARTUP_FAILED
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("treadle worker: cannot create SQLite database")
    assert logging.getLogger("treadle").handlers == before


# -- the --app loader -------------------------------------------------------------------


@pytest.fixture
def app_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("treadle_test_app")
    module.pipeline = ADD  # type: ignore[attr-defined]
    module.workflows = [ADD, WAIT]  # type: ignore[attr-defined]
    module.app = types.SimpleNamespace(workflows=(ADD,), nested=types.SimpleNamespace(wf=WAIT))  # type: ignore[attr-defined]
    module.dupes = [ADD, WorkflowBuilder("add-wf", input=Num).pipe(add).build()]  # type: ignore[attr-defined]
    module.same_twice = [ADD, ADD]  # type: ignore[attr-defined]
    module.text = "not workflows"  # type: ignore[attr-defined]
    module.mixed = [ADD, 3]  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def test_load_workflows_accepts_every_documented_form(app_module: types.ModuleType) -> None:
    """One definition, a list, an object with ``workflows``, a dotted attribute, or a bare
    module (its ``workflows``)."""
    assert load_workflows(None) == []
    assert load_workflows("treadle_test_app:pipeline") == [ADD]
    assert load_workflows("treadle_test_app:workflows") == [ADD, WAIT]
    assert load_workflows("treadle_test_app:app") == [ADD]
    assert load_workflows("treadle_test_app:app.nested.wf") == [WAIT]
    assert load_workflows("treadle_test_app") == [ADD, WAIT]
    assert load_workflows("treadle_test_app:same_twice") == [ADD]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "--app must be 'module:attr', got ''"),
        ("treadle_test_app:", "--app must be 'module:attr'"),
        ("treadle_test_app:nope", "'treadle_test_app' has no attribute 'nope'"),
        ("treadle_test_app:app.missing", "'treadle_test_app:app' has no attribute 'missing'"),
        ("treadle_test_app:text", "names a str, not a workflow definition"),
        ("treadle_test_app:mixed", "item 1 is a int, not a workflow definition"),
        ("treadle_test_app:dupes", "defines workflow id 'add-wf' twice"),
        ("json", "module 'json' has no 'workflows' attribute"),
    ],
)
def test_load_workflows_errors_name_the_problem(
    app_module: types.ModuleType, spec: str, message: str
) -> None:
    """Every bad --app is an AppLoadError whose single line says what is wrong."""
    with pytest.raises(AppLoadError) as caught:
        load_workflows(spec)
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_load_workflows_reports_a_module_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app module raising on import is reported with the error, in one line."""
    (tmp_path / "broken_app_xyz.py").write_text("raise RuntimeError('bad\\nconfig')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        AppLoadError, match=r"importing 'broken_app_xyz' failed: RuntimeError: bad config"
    ):
        load_workflows("broken_app_xyz:workflows")


# -- the stage thread pool --------------------------------------------------------------


def test_stage_pool_is_bounded_and_its_threads_are_daemons() -> None:
    """No more than max_workers threads run bodies at once; threads are daemons and are
    reused."""
    pool = StageThreadPool(2)
    release = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def body() -> str:
        with lock:
            running.append(threading.current_thread().name)
        release.wait(5)
        return threading.current_thread().name

    futures = [pool.submit(body) for _ in range(4)]
    deadline = time.monotonic() + 5
    while len(running) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(running) == 2  # the other two wait for a thread
    release.set()
    names = {f.result(5) for f in futures}
    assert len(names) == 2
    assert all(t.daemon for t in threading.enumerate() if t.name in names)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(body)


def test_stage_pool_shutdown_does_not_wait_for_a_stuck_body() -> None:
    """shutdown(wait=True) gives a stuck body at most join_timeout, so a released sync
    stage cannot hold a process open; queued work can be cancelled."""
    pool = StageThreadPool(1, join_timeout=0.05)
    stuck = threading.Event()
    first = pool.submit(stuck.wait, 5)
    queued = pool.submit(lambda: 1)
    began = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - began < 1
    assert queued.cancelled()
    stuck.set()
    assert first.result(5) is True


async def test_stage_pool_serves_asyncio_to_thread() -> None:
    """Installed as a loop's default executor, it runs asyncio.to_thread calls."""
    loop = asyncio.get_running_loop()
    pool = StageThreadPool(1)
    loop.set_default_executor(pool)
    name = await asyncio.to_thread(lambda: threading.current_thread().name)
    assert name.startswith("treadle-stage")
