#!/usr/bin/env bash
# Lint and type-check: ruff (lint + format check) and mypy strict on the package.
# Usage: bash scripts/lint.sh   (sets up .venv on first use, like the other scripts)
source "$(dirname "$0")/_env.sh"
echo "--- ruff ---"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "--- mypy (strict, on the package) ---"
# pyproject.toml names the package and finds it as `treadle` through the committed
# link .typing/treadle (docs/architecture.md, "Tools on the checkout").
.venv/bin/mypy
