# Shared by scripts/*.sh: create .venv on first use and install Treadle with its extras.
# Re-installs when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.treadle-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=.venv/install.log
  if ! .venv/bin/python -m pip install -e ".[dev,sql,postgres,cli]" >"$log" 2>&1; then
    cat "$log" >&2
    echo "installing Treadle into .venv failed (log above)" >&2
    exit 1
  fi
  touch "$stamp"
fi
