"""Complete in-memory adapters for every port: the test harness's storage, and the
reference the SQL adapters are held to by the shared contract suites."""

from treadle.adapters.memory.blob_store import InMemoryBlobStore
from treadle.adapters.memory.event_sink import CollectingEventSink
from treadle.adapters.memory.job_transport import InMemoryJobTransport
from treadle.adapters.memory.persistence import InMemoryPersistence, InMemoryTransaction
from treadle.adapters.memory.scheduler import InMemoryScheduler
from treadle.adapters.memory.workers import InMemoryWorkerRegistry

__all__ = [
    "CollectingEventSink",
    "InMemoryBlobStore",
    "InMemoryJobTransport",
    "InMemoryPersistence",
    "InMemoryScheduler",
    "InMemoryTransaction",
    "InMemoryWorkerRegistry",
]
