"""Identifier generation. uuid7 ids sort by creation time, which keeps B-tree
inserts local on PostgreSQL; the timestamp comes from the injected Clock."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime

_LOW62 = (1 << 62) - 1
_LOW70 = (1 << 70) - 1


_POOL_IDS = 256
"""Ids' worth of system randomness drawn per ``os.urandom`` call (70 bits each)."""


class Uuid7Ids:
    """RFC 9562 version-7 UUIDs: 48-bit ms timestamp from the clock, 74 random bits,
    and a per-millisecond counter so ids from one generator stay strictly ordered.

    The random bits come from the system's CSPRNG (as RFC 9562 asks), drawn in blocks:
    one ``os.urandom`` system call per 256 ids rather than the one per id that
    ``secrets.randbits`` costs."""

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self._last_ms = -1
        self._counter = 0
        self._pool: list[int] = []
        self._pool_pid = 0
        self._prefix = ""

    def _refill(self, pid: int) -> None:
        block = os.urandom(9 * _POOL_IDS)
        self._pool[:] = [int.from_bytes(block[i : i + 9]) & _LOW70 for i in range(0, len(block), 9)]
        self._pool_pid = pid

    def new_id(self) -> str:
        ms = int(self._now().timestamp() * 1000)
        pool, pid = self._pool, os.getpid()
        if not pool or pid != self._pool_pid:
            # A forked child never uses what is left of the parent's block: the parent
            # goes on using it, and the two would hand out the same bits.
            self._refill(pid)
        bits = pool.pop()
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
            if self._counter > 0xFFF:
                ms += 1
                self._counter = 0
            rand = bits & _LOW62
        else:
            # A fresh millisecond: the counter starts at a random value below 256.
            self._counter, rand = bits >> 62, bits & _LOW62
        if ms != self._last_ms:
            self._last_ms = ms
            # The first 12 hex digits (the 48-bit timestamp) change once per millisecond.
            t = f"{ms & 0xFFFFFFFFFFFF:012x}"
            self._prefix = f"{t[:8]}-{t[8:]}-7"
        # The canonical 8-4-4-4-12 text of ``uuid.UUID(int=value)``, without building one:
        # version 7, the 12-bit counter, the variant bits, 62 random bits.
        r = f"{(0b10 << 62) | rand:016x}"
        return f"{self._prefix}{self._counter & 0xFFF:03x}-{r[:4]}-{r[4:]}"


class SequentialIds:
    """Deterministic ids (``prefix-000001``...) for tests and reproducible demos."""

    def __init__(self, prefix: str = "id") -> None:
        self._prefix = prefix
        self._n = 0

    def new_id(self) -> str:
        self._n += 1
        return f"{self._prefix}-{self._n:06d}"
