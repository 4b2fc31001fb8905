"""In-memory BlobStore: a dict of bytes."""

from __future__ import annotations

from collections.abc import Sequence


class InMemoryBlobStore:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def put(self, key: str, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"blob {key!r}: data must be bytes, got {type(data).__name__}")
        self.blobs[key] = bytes(data)

    async def get(self, key: str) -> bytes:
        try:
            return self.blobs[key]
        except KeyError:
            raise KeyError(f"no blob with key {key!r}") from None

    async def has(self, key: str) -> bool:
        return key in self.blobs

    async def delete(self, key: str) -> bool:
        return self.blobs.pop(key, None) is not None

    async def delete_prefixes(self, prefixes: Sequence[str]) -> int:
        """Delete every blob under any of ``prefixes`` (``BlobRetention``)."""
        wanted = tuple(prefix for prefix in prefixes if prefix)
        gone = [key for key in self.blobs if wanted and key.startswith(wanted)]
        for key in gone:
            del self.blobs[key]
        return len(gone)

    async def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.blobs if k.startswith(prefix))
