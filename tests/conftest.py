"""Shared test configuration.

PostgreSQL tests use the server named by ``TREADLE_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Where none is reachable
they skip with a reason, unless ``TREADLE_REQUIRE_POSTGRES=1`` (set by
``.ci/run``), which turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest

POSTGRES_URL = os.environ.get(
    "TREADLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def require_postgres() -> bool:
    return os.environ.get("TREADLE_REQUIRE_POSTGRES", "") not in ("", "0", "false")


def skip_or_fail_without_postgres(reason: str) -> None:
    """Skip on a laptop without PostgreSQL; fail in CI, where it must be tested."""
    if require_postgres():
        pytest.fail(f"PostgreSQL is required (TREADLE_REQUIRE_POSTGRES=1): {reason}")
    pytest.skip(f"PostgreSQL not reachable: {reason}")
