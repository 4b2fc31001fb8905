"""Identifier generation. uuid7 ids sort by creation time, which keeps B-tree
inserts local on PostgreSQL; the timestamp comes from the injected Clock."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime


class Uuid7Ids:
    """RFC 9562 version-7 UUIDs: 48-bit ms timestamp from the clock, 74 random bits,
    and a per-millisecond counter so ids from one generator stay strictly ordered."""

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self._last_ms = -1
        self._counter = 0

    def new_id(self) -> str:
        ms = int(self._now().timestamp() * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
            if self._counter > 0xFFF:
                ms += 1
                self._counter = 0
            rand = secrets.randbits(62)
        else:
            # One draw from the system's randomness for both fields: it costs a syscall.
            bits = secrets.randbits(70)
            self._counter, rand = bits >> 62, bits & 0x3FFFFFFFFFFFFFFF
        self._last_ms = ms
        value = (ms & 0xFFFFFFFFFFFF) << 80
        value |= 0x7 << 76
        value |= (self._counter & 0xFFF) << 64
        value |= 0b10 << 62
        value |= rand
        # The canonical 8-4-4-4-12 text of ``uuid.UUID(int=value)``, without building one.
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class SequentialIds:
    """Deterministic ids (``prefix-000001``...) for tests and reproducible demos."""

    def __init__(self, prefix: str = "id") -> None:
        self._prefix = prefix
        self._n = 0

    def new_id(self) -> str:
        self._n += 1
        return f"{self._prefix}-{self._n:06d}"
