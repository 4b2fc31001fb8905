"""The BlobStore port: named bytes (artifacts, offloaded payloads)."""

from __future__ import annotations

from typing import Protocol


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes:
        """The blob's bytes; ``KeyError`` naming the key when it does not exist."""

    async def has(self, key: str) -> bool: ...

    async def delete(self, key: str) -> bool:
        """Remove the blob; returns whether it existed."""

    async def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""
