"""Adapters implement the ports: ``memory`` now; SQL, blob stores and sinks alongside."""

from treadle.adapters.clock import SystemClock

__all__ = ["SystemClock"]
