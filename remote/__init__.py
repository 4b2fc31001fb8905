"""``treadle.remote``: run remote stages in a process that has no database, over HTTP.

A stage defined with ``define_stage(..., remote=True)`` is never executed by an
in-process worker: its jobs wait until a remote worker leases them from ``treadle
serve`` (``POST /api/v1/workers/{id}/lease``, ``docs/remote-workers.md``).
``RemoteWorker`` is that worker in Python: a registry of handlers per stage id, a
long-poll lease loop, a heartbeat per running job, and the outcome reported with
``complete``, ``fail`` or ``suspend``. It needs only ``httpx`` (the ``remote`` extra)
and imports nothing else of Treadle.
"""

from treadle.remote.worker import RemoteFailure, RemoteJob, RemoteSuspend, RemoteWorker

__all__ = ["RemoteFailure", "RemoteJob", "RemoteSuspend", "RemoteWorker"]
