#!/usr/bin/env bash
# The test command: sets up .venv, runs the whole suite with branch coverage, and
# fails if kernel/ branch coverage drops under 90%. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
.venv/bin/python -m pytest -p no:cacheprovider --cov=treadle --cov-branch \
  --cov-report=term:skip-covered "$@"
echo "--- kernel/ coverage (must be >= 90%) ---"
.venv/bin/python -m coverage report --include="*/kernel/*" --skip-covered --fail-under=90
