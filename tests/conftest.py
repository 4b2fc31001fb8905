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
