"""The remote worker protocol over real HTTP: a uvicorn server on a free port, an
in-process worker for the local stages, and remote workers in Node.js and Python."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn

from treadle import Engine, RunStatus, StageContext, WorkflowBuilder, define_stage
from treadle.hosts.http import TokenAuth, create_app
from treadle.hosts.http.workers import RemoteWorkerProtocol
from treadle.kernel.retry import RetryPolicy
from treadle.remote import RemoteFailure, RemoteJob, RemoteWorker
from treadle.tests.scenario.helpers import until, until_status

ROOT = Path(__file__).resolve().parents[2]
NODE_WORKER = ROOT / "examples" / "remote-node" / "worker.mjs"
TOKEN = "worker-token-0123456789"
OTHER = "worker-token-other-98765"
READER = "read-token-0123456789ab"


class Text(BaseModel):
    text: str


class Words(BaseModel):
    words: list[str]
    lang: str = "en"


class ShoutConfig(BaseModel):
    suffix: str = "!"


@define_stage(id="split", input=Text, output=Words)
async def split(ctx: StageContext[Text, None]) -> Words:
    return Words(words=ctx.input.text.split())


@define_stage(
    id="shout",
    input=Words,
    output=Words,
    config=ShoutConfig,
    remote=True,
    retry=RetryPolicy(max_attempts=3, initial_delay=0.05),
)
def shout(ctx: StageContext[Words, ShoutConfig]) -> Words:
    raise AssertionError("remote stages run in remote workers")


@define_stage(id="join", input=Words, output=Text)
async def join(ctx: StageContext[Words, None]) -> Text:
    return Text(text=" ".join(ctx.input.words))


WF = WorkflowBuilder("shouter", input=Text).pipe(split).pipe(shout).pipe(join).build()


@dataclass
class Served:
    engine: Engine
    url: str
    protocol: RemoteWorkerProtocol

    def client(self, token: str = TOKEN) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


@pytest.fixture
async def served(treadle_database_url: str) -> AsyncIterator[Served]:
    """``treadle serve`` in miniature, on SQLite and on PostgreSQL: ``create_app`` with
    bearer tokens on uvicorn (a free port) and an in-process worker for the local stages
    that reaps leases silent for 1 s."""
    engine = await Engine.open(treadle_database_url, workflows=[WF])
    auth = TokenAuth({TOKEN: {"worker"}, OTHER: {"worker"}, READER: {"read"}})
    app = create_app(engine, auth=auth)
    protocol: RemoteWorkerProtocol = app.state.treadle.extras["workers"]
    protocol.poll_interval = 0.05
    protocol.heartbeat_interval = 0.25
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    async with (
        engine,
        engine.worker(
            concurrency=2,
            orchestration_interval=0.1,
            job_poll_interval=0.05,
            stale_lease_threshold=1.0,
        ),
    ):
        await until(lambda: server.started)
        try:
            yield Served(engine, f"http://127.0.0.1:{port}", protocol)
        finally:
            server.should_exit = True
            await serving
            protocol.close()
            sock.close()


def _node(served: Served, **env: str) -> subprocess.Popen[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    environ = {
        **os.environ,
        "TREADLE_URL": served.url,
        "TREADLE_TOKEN": TOKEN,
        "STAGE_ID": "shout",
        **env,
    }
    return subprocess.Popen(
        [node, str(NODE_WORKER)],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def _lease(client: httpx.AsyncClient, worker: str = "w1", wait: float = 10) -> dict[str, Any]:
    response = await client.post(f"/api/v1/workers/{worker}/lease", json={"wait": wait})
    assert response.status_code == 200, response.text
    jobs = response.json()["jobs"]
    assert len(jobs) == 1
    job: dict[str, Any] = jobs[0]
    return job


async def test_a_pipeline_whose_middle_stage_runs_in_the_node_worker(served: Served) -> None:
    """split (local) -> shout (Node.js, over HTTP) -> join (local): the run completes with
    the Node worker's output, config defaults applied."""
    node = _node(served, MAX_JOBS="1", WORKER_ID="node-1")
    try:
        handle = await served.engine.start("shouter", {"text": "hello remote world"})
        assert await handle.result(timeout=30) == {"text": "HELLO! REMOTE! WORLD!"}
        out, _ = await asyncio.to_thread(node.communicate, timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
            await asyncio.to_thread(node.communicate)
    assert node.returncode == 0, out
    assert "attempt 1: completed" in out
    run = await served.engine.get_run(handle.run_id)
    assert run.stages[1].attempt == 1


async def test_a_killed_remote_worker_loses_its_job_to_another_after_lease_expiry(
    served: Served,
) -> None:
    """A Node worker killed mid-stage stops heartbeating; after the (1 s) lease threshold
    the job is reaped and a Python worker leases it as attempt 2 and finishes the run."""
    node = _node(served, DELAY_MS="60000", WORKER_ID="node-doomed")
    try:
        handle = await served.engine.start("shouter", {"text": "again"})

        async def leased_by_node() -> bool:
            run = await served.engine.get_run(handle.run_id)
            return run.stages[1].status.value == "RUNNING"

        await until(leased_by_node)
    finally:
        node.send_signal(signal.SIGKILL)
        await asyncio.to_thread(node.communicate)
    worker = RemoteWorker(served.url, token=TOKEN, worker_id="py-rescuer", wait=5)
    seen: list[int] = []

    @worker.stage("shout")
    async def rescue(job: RemoteJob) -> dict[str, Any]:
        seen.append(job.attempt)
        return {"words": [w.upper() for w in job.input["words"]]}

    async with worker:
        await asyncio.wait_for(worker.run(max_jobs=1), 30)
    assert seen == [2]
    assert await handle.result(timeout=20) == {"text": "AGAIN"}
    events = [e async for e in served.engine.events(handle.run_id)]
    failed = [e for e in events if e.type == "stage:failed"]  # type: ignore[attr-defined]
    assert failed
    assert "lease" in (failed[0].error or "").lower()  # type: ignore[attr-defined]


async def test_a_worker_cannot_touch_a_job_it_did_not_lease(served: Served) -> None:
    """Another worker id, another token or a forged lease token gets 403 and changes
    nothing; the leasing worker's own call then commits."""
    handle = await served.engine.start("shouter", {"text": "mine"})
    async with served.client() as mine, served.client(OTHER) as theirs:
        job = await _lease(mine, "w-a")
        ref = {"job_id": job["job_id"], "lease_token": job["lease_token"]}
        output = {"words": ["X"]}
        refused = [
            await mine.post("/api/v1/workers/w-b/complete", json={**ref, "output": output}),
            await theirs.post("/api/v1/workers/w-a/complete", json={**ref, "output": output}),
            await mine.post(
                "/api/v1/workers/w-a/complete",
                json={**ref, "lease_token": "1." + "0" * 40, "output": output},
            ),
            await theirs.post("/api/v1/workers/w-a/fail", json={**ref, "error": "sabotage"}),
        ]
        assert [r.status_code for r in refused] == [403, 403, 403, 403]
        assert refused[0].json()["error"]["field"] == "lease_token"
        ok = await mine.post("/api/v1/workers/w-a/complete", json={**ref, "output": output})
        assert ok.status_code == 200
        assert ok.json()["outcome"] == "completed"
        assert not ok.json()["ghost"]
    assert await handle.result(timeout=20) == {"text": "X"}


async def test_complete_after_cancel_is_reported_as_a_ghost(served: Served) -> None:
    """A run cancelled while the remote worker runs: the heartbeat says so, and the late
    completion is answered ``ghost: true``; the run stays cancelled."""
    handle = await served.engine.start("shouter", {"text": "late"})
    async with served.client() as client:
        job = await _lease(client)
        ref = {"job_id": job["job_id"], "lease_token": job["lease_token"]}
        await served.engine.cancel(handle.run_id, reason="changed my mind")
        beat = await client.post("/api/v1/workers/w1/heartbeat", json=ref)
        assert beat.json() == {"held": False, "cancelled": True}
        late = await client.post(
            "/api/v1/workers/w1/complete", json={**ref, "output": {"words": ["z"]}}
        )
        assert late.status_code == 200
        assert late.json()["ghost"] is True
    run = await served.engine.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.stages[1].output is None


async def test_the_python_remote_worker_end_to_end(served: Served) -> None:
    """``RemoteWorker``: a failing first attempt is retried under the stage's policy, a
    pydantic output is sent as JSON, config defaults arrive, the run completes."""
    worker = RemoteWorker(served.url, token=TOKEN, worker_id="py-1", wait=5, concurrency=2)
    attempts: list[tuple[int, Any]] = []

    @worker.stage("shout")
    def shout_sync(job: RemoteJob) -> Words:
        attempts.append((job.attempt, job.config))
        if job.attempt == 1:
            raise RuntimeError("flaky")
        return Words(words=[w + job.config["suffix"] for w in job.input["words"]], lang="xx")

    handle = await served.engine.start("shouter", {"text": "a b"})
    async with worker:
        await asyncio.wait_for(worker.run(max_jobs=2), 30)
    assert attempts == [(1, {"suffix": "!"}), (2, {"suffix": "!"})]
    assert await handle.result(timeout=20) == {"text": "a! b!"}
    assert (worker.completed, worker.failed) == (1, 1)
    run = await served.engine.get_run(handle.run_id)
    assert "RemoteStageError: RuntimeError: flaky" in [
        e.error  # type: ignore[attr-defined]
        async for e in served.engine.events(handle.run_id)
        if e.type == "stage:failed"  # type: ignore[attr-defined]
    ]
    assert run.stages[1].attempt == 2


async def test_a_non_retryable_remote_failure_fails_the_run(served: Served) -> None:
    """``RemoteFailure(retryable=False)`` fails the stage on its first attempt."""
    worker = RemoteWorker(served.url, token=TOKEN, worker_id="py-2", wait=5)

    @worker.stage("shout")
    async def refuse(job: RemoteJob) -> None:
        raise RemoteFailure("bad document", retryable=False, error_type="ValueError")

    handle = await served.engine.start("shouter", {"text": "x"})
    async with worker:
        await asyncio.wait_for(worker.run(max_jobs=1), 30)
    await until_status(served.engine, handle.run_id, RunStatus.FAILED)
    run = await served.engine.get_run(handle.run_id)
    assert "ValueError: bad document" in (run.error or "")


async def test_scopes_fields_and_schemas(served: Served) -> None:
    """A token without the ``worker`` scope gets 403; an unknown queue or stage is a 422
    naming the field; the remote stages are listed with their JSON Schemas; a lease with
    nothing to do answers an empty list after its wait; a worker that leased is listed
    as serving the remote queue."""
    async with served.client(READER) as reader, served.client() as client:
        assert (await reader.post("/api/v1/workers/w1/lease", json={"wait": 0})).status_code == 403
        bad = await client.post("/api/v1/workers/w1/lease", json={"queues": ["default"]})
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "queues[0]"
        bad = await client.post("/api/v1/workers/w1/lease", json={"stage_ids": ["split"]})
        assert bad.json()["error"]["field"] == "stage_ids[0]"
        bad = await client.post("/api/v1/workers/bad id/lease", json={})
        assert bad.status_code == 422
        empty = await client.post("/api/v1/workers/w1/lease", json={"wait": 0.2})
        assert empty.json() == {"jobs": []}
        stages = (await client.get("/api/v1/workers/stages")).json()["stages"]
    assert [s["stage_id"] for s in stages] == ["shout"]
    (entry,) = stages
    assert entry["queue"] == "remote"
    assert entry["workflows"] == ["shouter"]
    assert entry["input_schema"]["properties"]["words"]["type"] == "array"
    assert entry["output_schema"]["title"] == "Words"
    assert entry["config_schema"]["properties"]["suffix"]["default"] == "!"
    queues = {q.queue: q for q in await served.engine.queues()}
    assert "w1" in queues["remote"].workers


async def test_a_waiting_lease_answers_as_soon_as_a_job_is_queued(served: Served) -> None:
    """A long-poll started before the run exists is woken by the commit that queues the
    remote job (no polling: the poll interval is longer than the test may take)."""
    served.protocol.poll_interval = 60.0
    async with served.client() as client:
        waiting = asyncio.create_task(client.post("/api/v1/workers/w1/lease", json={"wait": 20}))
        await asyncio.sleep(0)  # let the request go out first
        loop = asyncio.get_running_loop()
        began = loop.time()
        await served.engine.start("shouter", {"text": "soon"})
        response = await waiting
        assert loop.time() - began < 10
        assert len(response.json()["jobs"]) == 1


def test_the_node_example_is_short_and_dependency_free() -> None:
    """The Node example stays a ~100-line script with no imports (global fetch only)."""
    text = NODE_WORKER.read_text()
    assert len(text.splitlines()) <= 110
    assert "import " not in text
    assert "require(" not in text
    assert sys.version_info >= (3, 11)


async def test_doctor_warns_about_a_remote_queue_without_a_live_remote_worker(
    served: Served,
) -> None:
    """``treadle doctor --app``: a queue of remote stages with no live remote worker is a
    warning naming the queue and its stages; once a remote worker has leased (and so
    beaten into the worker registry), the check is ok."""
    from typer.testing import CliRunner

    from treadle.hosts.cli import build_app

    db = served.engine.backend.url
    argv = ["doctor", "--json", "--db", db, "--app", f"{__name__}:WF"]

    def doctor() -> dict[str, Any]:
        result = CliRunner().invoke(build_app(), argv)
        return {c["name"]: c for c in json.loads(result.stdout)["checks"]}

    def remote_check() -> dict[str, Any]:
        return doctor()["remote workers"]  # type: ignore[no-any-return]

    before = await asyncio.to_thread(remote_check)
    assert before["level"] == "warn", before
    assert "remote (stages shout; 0 due)" in before["detail"]
    await served.engine.start("shouter", {"text": "waiting"})

    async def remote_job_due() -> bool:
        queues = {q.queue: q for q in await served.engine.queues()}
        return "remote" in queues and queues["remote"].queued == 1

    await until(remote_job_due)
    checks = await asyncio.to_thread(doctor)
    assert "remote (stages shout; 1 due)" in checks["remote workers"]["detail"]
    # The generic queues check does not send the operator to `treadle worker --queue`.
    assert checks["queues"]["level"] == "ok", checks["queues"]
    async with served.client() as client:
        await client.post("/api/v1/workers/node-7/lease", json={"wait": 0})
    after = await asyncio.to_thread(remote_check)
    assert after["level"] == "ok", after
    assert "node-7" in after["detail"]


async def test_a_read_only_app_refuses_workers() -> None:
    """``create_app(..., read_only=True)`` answers every worker call 403 ``ReadOnly``,
    whatever the token's scopes."""
    async with await Engine.open("memory://", workflows=[WF]) as engine:
        app = create_app(engine, auth=TokenAuth({TOKEN: {"worker"}}), read_only=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://test",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as client:
            response = await client.post("/api/v1/workers/w1/lease", json={"wait": 0})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "ReadOnly"


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_node_worker_against_a_real_treadle_serve_process(
    treadle_sqlite_url: str, tmp_path: Path
) -> None:
    """``treadle serve --worker`` as its own process with a token file: a run started over
    the HTTP API has its middle stage done by the Node worker and completes."""
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.skip("node is not installed")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"worker:{TOKEN}\nact:{OTHER}\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    treadle = Path(sys.executable).with_name("treadle")
    serve = _spawn(
        [
            str(treadle),
            "serve",
            "--db",
            treadle_sqlite_url,
            "--app",
            f"{__name__}:WF",
            "--port",
            str(port),
            "--token-file",
            str(tokens),
            "--worker",
        ]
    )
    node = None
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:

            async def healthy() -> bool:
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    return serve.poll() is not None  # stop waiting if it died

            await until(healthy)
            assert serve.poll() is None, serve.communicate()[0]
            node = _spawn(
                [node_bin, str(NODE_WORKER)],
                {
                    **os.environ,
                    "TREADLE_URL": url,
                    "TREADLE_TOKEN": TOKEN,
                    "STAGE_ID": "shout",
                    "MAX_JOBS": "1",
                    "WORKER_ID": "node-serve",
                },
            )
            act = {"Authorization": f"Bearer {OTHER}"}
            started = await client.post(
                "/api/v1/runs",
                json={"workflow_id": "shouter", "input": {"text": "over http"}},
                headers=act,
            )
            assert started.status_code == 201, started.text
            run_id = started.json()["run_id"]

            async def completed() -> bool:
                run = await client.get(f"/api/v1/runs/{run_id}", headers=act)
                return run.json().get("status") == "COMPLETED"

            await until(completed)
            run = (await client.get(f"/api/v1/runs/{run_id}", headers=act)).json()
            assert run["output"] == {"text": "OVER! HTTP!"}
            out, _ = await asyncio.to_thread(node.communicate, timeout=20)
            assert node.returncode == 0, out
    finally:
        for proc in (node, serve):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                await asyncio.to_thread(proc.communicate, timeout=20)


def test_treadle_worker_refuses_to_serve_a_remote_queue(tmp_path: Path) -> None:
    """``treadle worker --queue remote`` exits 1 with one line naming the queue and its
    remote stages, instead of leasing jobs it must not run."""
    from typer.testing import CliRunner

    from treadle.hosts.cli import build_app

    db = f"sqlite:///{tmp_path / 'w.db'}"
    argv = ["worker", "--db", db, "--app", f"{__name__}:WF", "--queue", "remote"]
    result = CliRunner().invoke(build_app(), argv)
    assert result.exit_code == 1
    assert "queue 'remote' holds remote stages (shout)" in result.stderr


async def test_a_lease_call_dropped_by_its_client_does_not_keep_a_job(served: Served) -> None:
    """A worker that stops while its lease call waits (``RemoteWorker.stop``) drops the
    call; the job queued afterwards goes to the next lease as attempt 1, not to the
    departed worker (nothing leased for it, or handed back with the attempt refunded)."""
    async with served.client() as gone, served.client() as client:
        dropped = asyncio.create_task(gone.post("/api/v1/workers/gone-1/lease", json={"wait": 20}))

        async def waiting() -> bool:
            queues = {q.queue: q for q in await served.engine.queues()}
            return "remote" in queues and "gone-1" in queues["remote"].workers

        await until(waiting)
        dropped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dropped
        handle = await served.engine.start("shouter", {"text": "kept"})
        job = await _lease(client, "w-next", wait=20)
        assert job["attempt"] == 1
        ref = {"job_id": job["job_id"], "lease_token": job["lease_token"]}
        done = await client.post(
            "/api/v1/workers/w-next/complete", json={**ref, "output": {"words": ["K"]}}
        )
        assert done.json()["outcome"] == "completed"
    assert await handle.result(timeout=20) == {"text": "K"}
