"""``python run_worker.py '<json kwargs>'``: a worker process for the crash tests, running
``treadle.hosts.worker.main`` exactly as ``treadle worker`` does (``app`` defaults to
``crash_app:workflows``; the kwargs may name another)."""

import json
import sys

from treadle.hosts.worker import main

if __name__ == "__main__":
    sys.exit(main(**{"app": "crash_app:workflows", **json.loads(sys.argv[1])}))
