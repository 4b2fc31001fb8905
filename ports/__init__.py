"""Ports: one ``typing.Protocol`` per dependency the kernel has on the outside world."""

from treadle.ports.ai_calls import AICallLogger
from treadle.ports.blob_store import BlobStore
from treadle.ports.clock import Clock
from treadle.ports.cron import CronCalendar
from treadle.ports.event_sink import EventSink
from treadle.ports.ids import IdGenerator
from treadle.ports.job_transport import JobTransport
from treadle.ports.persistence import Persistence, Transaction
from treadle.ports.plugin import KernelPlugin
from treadle.ports.registry import WorkflowRegistry
from treadle.ports.retention import BlobRetention, JobRetention, RetentionStore
from treadle.ports.scheduler import Scheduler
from treadle.ports.schedules import ScheduleStore
from treadle.ports.telemetry import AttemptSpan, Telemetry
from treadle.ports.workers import WorkerRegistry

__all__ = [
    "AICallLogger",
    "AttemptSpan",
    "BlobRetention",
    "BlobStore",
    "Clock",
    "CronCalendar",
    "EventSink",
    "IdGenerator",
    "JobRetention",
    "JobTransport",
    "KernelPlugin",
    "Persistence",
    "RetentionStore",
    "ScheduleStore",
    "Scheduler",
    "Telemetry",
    "Transaction",
    "WorkerRegistry",
    "WorkflowRegistry",
]
