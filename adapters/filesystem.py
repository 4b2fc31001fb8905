"""Filesystem BlobStore: one file per blob under a root directory.

The embedded default next to SQLite: artifacts stay browsable on disk. Keys
map to paths segment by segment (``a/b/c`` becomes ``a/b/c.blob``), each
segment percent-encoded and with ``.`` escaped, so no key can climb out of the
root (``..``), hide as a dotfile, or collide with a directory (a blob file always
ends in ``.blob``, an encoded directory name never contains a dot). Writes go to
a temporary file in the target directory and are moved into place with
``os.replace``: a reader sees the old bytes or the new ones, never a torn file.
A key whose segments cannot be file names (longer than 255 bytes encoded) is
stored under ``%LONG/<sha256 of the key>.blob`` with the key itself in a ``.key``
file beside it, so every string is a valid key, as with the other stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, unquote

_SUFFIX = ".blob"
_EMPTY = "%EMPTY"
_LONG = "%LONG"
_KEY_SUFFIX = ".key"
_MAX_NAME = 255


def _encode_segment(segment: str) -> str:
    if segment == "":
        return _EMPTY
    return quote(segment, safe="").replace(".", "%2E")


def _decode_segment(name: str) -> str:
    return "" if name == _EMPTY else unquote(name)


class FileSystemBlobStore:
    """The BlobStore port on a directory; safe for several processes on one host."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (it need not exist)."""
        if not isinstance(key, str):
            raise TypeError(f"blob key must be a string, got {type(key).__name__}")
        parts = [_encode_segment(s) for s in key.split("/")]
        parts[-1] += _SUFFIX
        if any(len(part.encode()) > _MAX_NAME for part in parts):
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            return self.root / _LONG / (digest + _SUFFIX)
        return self.root.joinpath(*parts)

    def _key_for(self, path: Path) -> str:
        rel = path.relative_to(self.root).parts
        if rel[0] == _LONG:
            return path.with_suffix(_KEY_SUFFIX).read_text(encoding="utf-8", errors="surrogatepass")
        segments = [_decode_segment(p) for p in rel[:-1]]
        segments.append(_decode_segment(rel[-1][: -len(_SUFFIX)]))
        return "/".join(segments)

    # -- blocking helpers, run off the event loop ------------------------------
    def _write(self, key: str, data: bytes) -> None:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.name == _LONG:
            self._replace(path.with_suffix(_KEY_SUFFIX), key.encode("utf-8", "surrogatepass"))
        self._replace(path, data)

    @staticmethod
    def _replace(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(f"no blob with key {key!r}") from None

    def _delete(self, key: str) -> bool:
        path = self.path_for(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        if path.parent.name == _LONG:
            with contextlib.suppress(OSError):
                path.with_suffix(_KEY_SUFFIX).unlink()
        return True

    def _list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        if not self.root.is_dir():
            return keys
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            base = Path(dirpath)
            for name in filenames:
                if name.startswith(".") or not name.endswith(_SUFFIX):
                    continue
                key = self._key_for(base / name)
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    # -- the port ---------------------------------------------------------------
    async def put(self, key: str, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"blob {key!r}: data must be bytes, got {type(data).__name__}")
        await asyncio.to_thread(self._write, key, bytes(data))

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._read, key)

    async def has(self, key: str) -> bool:
        path = self.path_for(key)
        return await asyncio.to_thread(path.is_file)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self._delete, key)

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    async def delete_prefixes(self, prefixes: Sequence[str]) -> int:
        """Delete every blob under any of ``prefixes`` with one walk of the directory
        (``BlobRetention``: ``list`` walks it once per prefix); returns how many."""
        wanted = tuple(prefix for prefix in prefixes if prefix)
        if not wanted:
            return 0

        def sweep() -> int:
            return sum(self._delete(key) for key in self._list("") if key.startswith(wanted))

        return await asyncio.to_thread(sweep)
