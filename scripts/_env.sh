# Shared by scripts/*.sh: create .venv on first use and install Treadle with its extras.
# Re-installs when pyproject.toml changed since the last install. Says what it is doing
# on stderr: the first install takes about a minute and would otherwise look hung.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
say() { echo "[treadle] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1) ..."
  "$PY" -m venv .venv
fi
stamp=.venv/.treadle-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=.venv/install.log
  if [ -f "$stamp" ]; then
    say "pyproject.toml changed: updating .venv (log: $log) ..."
  else
    say "installing Treadle and its dependencies into .venv (about a minute the first time; log: $log) ..."
  fi
  started=$SECONDS
  .venv/bin/python -m pip install -e ".[dev,sql,postgres,cli,server,otel,ai,aws,webhook]" >"$log" 2>&1 &
  pip_pid=$!
  # A line every 10 s so a slow first install is visibly alive.
  every="${TREADLE_INSTALL_PROGRESS_SECONDS:-10}"
  while kill -0 "$pip_pid" 2>/dev/null; do
    for _ in $(seq 1 "$every"); do
      sleep 1
      kill -0 "$pip_pid" 2>/dev/null || break
    done
    if kill -0 "$pip_pid" 2>/dev/null; then
      last=$(grep -E '^(Collecting|Building|Installing|Successfully)' "$log" | tail -n 1 || true)
      say "  still installing ($((SECONDS - started)) s)${last:+: $last}"
    fi
  done
  if ! wait "$pip_pid"; then
    cat "$log" >&2
    echo "installing Treadle into .venv failed (log above)" >&2
    exit 1
  fi
  touch "$stamp"
  say "installed in $((SECONDS - started)) s"
fi
