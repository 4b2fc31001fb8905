#!/usr/bin/env bash
# Lint and type-check: ruff (lint + format check) and mypy strict on the package.
# Usage: bash scripts/lint.sh   (sets up .venv on first use, like the other scripts)
source "$(dirname "$0")/_env.sh"
echo "--- ruff ---"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "--- mypy (strict, on the package) ---"
# The repository root is the package; mypy needs it under a directory named treadle.
typecheck_root="$(mktemp -d)"
trap 'rm -rf "$typecheck_root"' EXIT
ln -s "$ROOT" "$typecheck_root/treadle"
(cd "$typecheck_root" && "$ROOT/.venv/bin/mypy" --config-file "$ROOT/pyproject.toml" -p treadle)
