#!/usr/bin/env bash
# The main job: sets up .venv and runs the example document pipeline end to end.
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python examples/document_pipeline.py "$@"
