"""Shared test configuration.

The database fixtures come from Treadle's own pytest plugin (``treadle.testing.plugin``,
``pytest11`` entry point): ``treadle_sqlite_url``, ``treadle_postgres_url`` (a fresh
migrated database per test, copied from a per-session template) and
``treadle_database_url`` (both in turn); suites needing other shapes build on
``treadle.testing.databases``. PostgreSQL tests use the server named by
``TREADLE_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Where none is reachable they
skip with a reason, unless ``TREADLE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) turns
that skip into a failure.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""moto accepts any credentials; boto3 needs some to sign requests."""


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in this process, over real HTTP on 127.0.0.1 (a free port): the
    S3 blob store's requests go through botocore's HTTP stack, not a patched client."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    """A boto3 S3 client on the moto server."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket on the moto server for this test."""
    name = f"treadle-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(s3_client: Any, s3_bucket: str) -> Callable[..., Any]:
    """``s3_store(prefix="...", **options)``: an ``S3BlobStore`` on this test's bucket."""
    from treadle.adapters.aws.s3 import S3BlobStore

    def make(prefix: str = "treadle/", **options: Any) -> S3BlobStore:
        return S3BlobStore(s3_bucket, prefix, client=s3_client, **options)

    return make
