#!/usr/bin/env bash
# The main job: sets up .venv and runs `treadle demo`, the example document pipeline
# (parallel group, retried stage, suspending batch stage) on SQLite with live progress.
# Extra arguments go to `treadle demo` (e.g. --file ./treadle-demo.db to keep the runs).
source "$(dirname "$0")/_env.sh"
exec .venv/bin/treadle demo "$@"
