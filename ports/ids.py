"""The id port: where run, job and annotation ids come from (uuid7 by default)."""

from __future__ import annotations

from typing import Protocol


class IdGenerator(Protocol):
    def new_id(self) -> str: ...
