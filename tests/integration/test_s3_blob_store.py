"""S3BlobStore against a moto S3 server over real HTTP (127.0.0.1): large objects,
missing keys, paginated listings, encryption settings, errors that name the bucket,
selection by URL, and runs whose large payloads are offloaded to S3 (SQLite and
PostgreSQL). The port's contract suite runs on S3 too (tests/contract)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.adapters.aws.s3 import S3BlobStore
from treadle.adapters.sql import schema as t
from treadle.adapters.sql.payloads import PAYLOAD_REF
from treadle.kernel.errors import StorageError, TransientStorageError, TreadleError
from treadle.runtime.backends import open_blob_store

pytest.importorskip("moto")
pytest.importorskip("boto3")

MB = 1024 * 1024


def _objects(client: Any, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


async def test_a_large_object_round_trips(s3_store: Callable[..., S3BlobStore]) -> None:
    """Several megabytes of arbitrary bytes are stored and read back byte for byte."""
    store = s3_store()
    data = os.urandom(6 * MB + 123)
    await store.put("runs/r1/artifacts/big.bin", data)
    assert await store.get("runs/r1/artifacts/big.bin") == data
    assert await store.has("runs/r1/artifacts/big.bin") is True


async def test_a_missing_key_is_a_key_error_and_not_there(
    s3_store: Callable[..., S3BlobStore],
) -> None:
    """A key never written: ``get`` raises ``KeyError`` naming it, ``has`` and ``delete``
    say False (not a StorageError: the bucket is fine)."""
    store = s3_store()
    with pytest.raises(KeyError, match="runs/none/out"):
        await store.get("runs/none/out")
    assert await store.has("runs/none/out") is False
    assert await store.delete("runs/none/out") is False


async def test_listing_follows_pagination(
    s3_store: Callable[..., S3BlobStore], s3_client: Any
) -> None:
    """With a page size of 10, a listing of 45 keys takes several ListObjectsV2 requests
    and returns every key, sorted, without the store's prefix."""
    store = s3_store(page_size=10)
    keys = [f"runs/r{i:03d}/out" for i in range(45)] + ["other/x"]
    for key in keys:
        await store.put(key, b"x")
    requests: list[str] = []
    s3_client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **_: requests.append("list")
    )
    assert await store.list("runs/") == sorted(keys[:45])
    assert len(requests) == 5
    assert await store.list() == sorted(keys)
    assert await store.delete_prefixes(["runs/r00", "runs/r01"]) == 20
    assert len(await store.list("runs/")) == 25


async def test_the_prefix_is_the_stores_namespace(
    s3_store: Callable[..., S3BlobStore], s3_client: Any, s3_bucket: str
) -> None:
    """Keys are stored as ``prefix + key``; two stores on one bucket with different
    prefixes do not see each other's blobs."""
    a, b = s3_store("team-a/"), s3_store("team-b/")
    await a.put("runs/r1/out", b"a")
    await b.put("runs/r1/out", b"b")
    assert _objects(s3_client, s3_bucket) == ["team-a/runs/r1/out", "team-b/runs/r1/out"]
    assert await a.get("runs/r1/out") == b"a"
    assert await b.list() == ["runs/r1/out"]
    assert await a.delete_prefixes(["runs/"]) == 1
    assert _objects(s3_client, s3_bucket) == ["team-b/runs/r1/out"]


async def test_server_side_encryption_settings_reach_s3(
    s3_store: Callable[..., S3BlobStore], s3_client: Any, s3_bucket: str
) -> None:
    """``sse="AES256"`` (SSE-S3) and ``kms_key_id`` (SSE-KMS) are sent with every put, and
    S3 records them on the object; reads need no setting."""
    await s3_store(sse="AES256").put("sse-s3", b"secret")
    head = s3_client.head_object(Bucket=s3_bucket, Key="treadle/sse-s3")
    assert head["ServerSideEncryption"] == "AES256"
    kms = s3_store(kms_key_id="alias/treadle")
    assert kms.sse == "aws:kms"
    await kms.put("sse-kms", b"secret")
    head = s3_client.head_object(Bucket=s3_bucket, Key="treadle/sse-kms")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert "alias/treadle" in head["SSEKMSKeyId"]
    assert await kms.get("sse-kms") == b"secret"


def test_bad_settings_are_refused_naming_them() -> None:
    """A bucket with a slash, an unknown SSE mode, a KMS key with SSE-S3 and an
    oversized key are refused with a message naming the setting."""
    client: Any = object()
    with pytest.raises(ValueError, match="bucket"):
        S3BlobStore("a/b", client=client)
    with pytest.raises(ValueError, match="sse"):
        S3BlobStore("b", client=client, sse="rot13")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kms_key_id"):
        S3BlobStore("b", client=client, sse="AES256", kms_key_id="k")
    with pytest.raises(ValueError, match="too long"):
        S3BlobStore("b", client=client).object_key("k" * 1100)


async def test_a_missing_bucket_is_a_storage_error_naming_it(
    s3_client: Any,
) -> None:
    """Writing to, reading from or checking a bucket that does not exist is a
    ``StorageError`` naming the bucket, not a ``KeyError``."""
    store = S3BlobStore("no-such-bucket-treadle", "p/", client=s3_client)
    with pytest.raises(StorageError, match="no-such-bucket-treadle"):
        await store.put("k", b"x")
    with pytest.raises(StorageError, match="no-such-bucket-treadle"):
        await store.check()
    with pytest.raises(StorageError, match="no-such-bucket-treadle"):
        await store.list()


async def test_an_unreachable_endpoint_is_a_transient_storage_error() -> None:
    """No S3 server at the endpoint: a retryable ``TransientStorageError`` naming the
    bucket (a stage writing an artifact is retried, not failed for good)."""
    import boto3
    from botocore.config import Config

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    store = S3BlobStore("down-bucket", client=client)
    with pytest.raises(TransientStorageError, match="down-bucket"):
        await store.check()
    with pytest.raises(TransientStorageError, match="down-bucket"):
        await store.get("k")


def test_an_s3_url_names_bucket_prefix_and_options() -> None:
    """``s3://bucket/prefix?region=...&sse=...`` sets each option; a prefix gets its
    trailing slash; an unknown parameter is refused naming it."""
    client: Any = object()
    store = S3BlobStore.from_url(
        "s3://my-bucket/treadle/prod?sse=aws:kms&kms_key_id=alias/k&page_size=50", client=client
    )
    assert (store.bucket, store.prefix, store.sse, store.kms_key_id, store.page_size) == (
        "my-bucket",
        "treadle/prod/",
        "aws:kms",
        "alias/k",
        50,
    )
    assert S3BlobStore.from_url("s3://b", client=client).prefix == ""
    with pytest.raises(ValueError, match="colour"):
        S3BlobStore.from_url("s3://b/p?colour=red", client=client)
    with pytest.raises(TreadleError, match="unsupported blobs location"):
        open_blob_store("ftp://host/dir")


async def test_the_blobs_url_selects_s3(
    s3_endpoint: str, s3_bucket: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Engine.open(..., blobs="s3://...")`` and ``$TREADLE_BLOBS_URL`` put the engine's
    blobs (artifacts, offloaded payloads) in the bucket."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3_bucket}/by-url?endpoint_url={s3_endpoint}"
    async with await Engine.open("memory://", blobs=url) as engine:
        assert engine.backend is not None
        store = engine.backend.blob_store
        assert isinstance(store, S3BlobStore)
        await store.put("hello", b"world")
    monkeypatch.setenv("TREADLE_BLOBS_URL", f"s3://{s3_bucket}/by-env?endpoint_url={s3_endpoint}")
    async with await Engine.open("memory://") as engine:
        assert engine.backend is not None
        await engine.backend.blob_store.put("hello", b"env")
    assert _objects(s3_client, s3_bucket) == ["by-env/hello", "by-url/hello"]


# -- end to end: payload offload into S3 ------------------------------------------------
class Text(BaseModel):
    text: str


@define_stage(id="grow", input=Text, output=Text)
async def grow(ctx):  # type: ignore[no-untyped-def]
    await ctx.artifacts.put("report.txt", b"r" * 10_000)
    return Text(text=ctx.input.text * 50_000)


@define_stage(id="measure", input=Text, output=Text)
async def measure(ctx):  # type: ignore[no-untyped-def]
    return Text(text=str(len(ctx.input.text)))


WF = WorkflowBuilder("s3-offload", input=Text).pipe(grow).pipe(measure).build()


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
async def test_a_run_offloads_its_large_payloads_to_s3(
    dialect: str,
    request: pytest.FixtureRequest,
    s3_store: Callable[..., S3BlobStore],
    s3_client: Any,
    s3_bucket: str,
) -> None:
    """A run on SQLite or PostgreSQL with an S3 blob store: the stage output past the
    threshold and the stage's artifact are objects in the bucket, the database row holds
    only a reference, and the run's API reads the value back."""
    url = request.getfixturevalue(
        "treadle_sqlite_url" if dialect == "sqlite" else "treadle_postgres_url"
    )
    store = s3_store(f"{dialect}/")
    engine = await Engine.open(url, workflows=[WF], blobs=store, payload_max_bytes=4096)
    try:
        async with engine.worker(concurrency=2):
            handle = await engine.start("s3-offload", {"text": "ab"})
            assert await handle.result(timeout=30) == {"text": "100000"}
        run = await engine.get_run(handle.run_id)
        assert run.stages[0].output == {"text": "ab" * 50_000}
        assert engine.backend is not None
        async with engine.backend.persistence.engine.connect() as conn:  # type: ignore[attr-defined]
            rows = (
                await conn.execute(
                    sa.select(t.stages.c.output).where(
                        t.stages.c.run_id == run.id, t.stages.c.stage_id == "grow"
                    )
                )
            ).all()
        assert PAYLOAD_REF in str(rows[0][0])
        objects = _objects(s3_client, s3_bucket)
        payloads = [key for key in objects if key.startswith(f"{dialect}/payloads/")]
        assert payloads
        stored = [await store.get(key.removeprefix(f"{dialect}/")) for key in payloads]
        assert any(b"abab" in data for data in stored)
        artifact = f"{dialect}/runs/{run.id}/stages/grow/artifacts/report.txt"
        assert artifact in objects
        assert set(objects) == {*payloads, artifact}
    finally:
        await engine.aclose()


async def test_a_worker_host_given_blobs_offloads_to_s3(
    treadle_sqlite_url: str,
    s3_endpoint: str,
    s3_bucket: str,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``WorkerHost(..., blobs="s3://...")`` (what ``treadle worker --blobs`` builds)
    runs stages whose large outputs and artifacts go to the bucket; an engine opened on
    the same database and bucket reads them back."""
    from treadle.hosts.worker import WorkerHost

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    blobs = f"s3://{s3_bucket}/worker?endpoint_url={s3_endpoint}"
    async with await Engine.open(
        treadle_sqlite_url, workflows=[WF], blobs=blobs, payload_max_bytes=4096
    ) as engine:
        # 400 KB of output: past the worker's default threshold (256 KiB) as well.
        handle = await engine.start("s3-offload", {"text": "abcdefgh"})
        host = WorkerHost(
            [WF], db=treadle_sqlite_url, blobs=blobs, orchestration_interval=0.05,
            job_poll_interval=0.02,
        )  # fmt: skip
        serving = asyncio.create_task(host.serve())
        try:
            assert await handle.result(timeout=30) == {"text": "400000"}
        finally:
            host.request_stop()
            assert await asyncio.wait_for(serving, 30) == 0
        run = await engine.get_run(handle.run_id)
        assert run.stages[0].output == {"text": "abcdefgh" * 50_000}
    objects = _objects(s3_client, s3_bucket)
    assert f"worker/runs/{handle.run_id}/stages/grow/artifacts/report.txt" in objects
    assert any(key.startswith("worker/payloads/") for key in objects)
