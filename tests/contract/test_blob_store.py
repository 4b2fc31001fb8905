"""BlobStore contract: memory, filesystem and the SQL table (SQLite and PostgreSQL) store
named bytes identically."""

from __future__ import annotations

from typing import Any

import pytest

KEYS = [
    "runs/r1/stages/extract/text",
    "runs/r1/stages/extract/meta.json",
    "runs/r10/input",
    "runs/r2/input",
    "payloads/p1",
]


async def test_put_then_get_returns_the_bytes(blob_store: Any) -> None:
    """A stored blob reads back byte for byte, and ``has`` reports it."""
    await blob_store.put("runs/r1/out", b"hello")
    assert await blob_store.get("runs/r1/out") == b"hello"
    assert await blob_store.has("runs/r1/out") is True
    assert await blob_store.has("runs/r1") is False


async def test_get_of_a_missing_key_raises_key_error_naming_it(blob_store: Any) -> None:
    """Reading an unknown key raises ``KeyError`` whose message names the key."""
    with pytest.raises(KeyError, match="runs/missing/blob"):
        await blob_store.get("runs/missing/blob")
    assert await blob_store.has("runs/missing/blob") is False


async def test_put_overwrites(blob_store: Any) -> None:
    """Putting an existing key replaces its bytes (shorter data leaves no tail behind)."""
    await blob_store.put("k", b"a much longer first version")
    await blob_store.put("k", b"v2")
    assert await blob_store.get("k") == b"v2"
    assert await blob_store.list() == ["k"]


async def test_binary_and_empty_blobs_round_trip(blob_store: Any) -> None:
    """Arbitrary bytes (NUL, invalid UTF-8, every byte value) and an empty blob survive."""
    every_byte = bytes(range(256)) * 64
    await blob_store.put("bin", every_byte)
    await blob_store.put("nul", b"\x00\xff\x00")
    await blob_store.put("empty", b"")
    await blob_store.put("view", memoryview(b"from a view"))
    assert await blob_store.get("bin") == every_byte
    assert await blob_store.get("nul") == b"\x00\xff\x00"
    assert await blob_store.get("empty") == b""
    assert await blob_store.has("empty") is True
    assert await blob_store.get("view") == b"from a view"
    assert isinstance(await blob_store.get("view"), bytes)


async def test_put_rejects_non_bytes(blob_store: Any) -> None:
    """Only bytes-like data is stored; a ``str`` is a ``TypeError`` naming the key."""
    with pytest.raises(TypeError, match="txt"):
        await blob_store.put("txt", "not bytes")
    assert await blob_store.has("txt") is False


async def test_delete_reports_whether_the_blob_existed(blob_store: Any) -> None:
    """``delete`` removes the blob and returns True; deleting again returns False."""
    await blob_store.put("a/b", b"x")
    await blob_store.put("a/c", b"y")
    assert await blob_store.delete("a/b") is True
    assert await blob_store.delete("a/b") is False
    assert await blob_store.delete("never") is False
    assert await blob_store.has("a/b") is False
    with pytest.raises(KeyError, match="a/b"):
        await blob_store.get("a/b")
    assert await blob_store.list() == ["a/c"]


async def test_list_filters_by_prefix_and_sorts(blob_store: Any) -> None:
    """``list`` returns keys sorted by code point, narrowed by a plain string prefix."""
    for key in KEYS:
        await blob_store.put(key, key.encode())
    assert await blob_store.list() == sorted(KEYS)
    assert await blob_store.list("") == sorted(KEYS)
    assert await blob_store.list("runs/r1") == [
        "runs/r1/stages/extract/meta.json",
        "runs/r1/stages/extract/text",
        "runs/r10/input",
    ]
    assert await blob_store.list("runs/r1/") == [
        "runs/r1/stages/extract/meta.json",
        "runs/r1/stages/extract/text",
    ]
    assert await blob_store.list("payloads/") == ["payloads/p1"]
    assert await blob_store.list("nothing") == []


async def test_list_prefix_is_literal_and_case_sensitive(blob_store: Any) -> None:
    """A prefix matches literally: case counts and ``%``, ``_``, ``*`` are not wildcards."""
    for key in ["Run/A", "run/a", "run_x", "run%y", "run*z", "runQ"]:
        await blob_store.put(key, b"")
    assert await blob_store.list("run") == ["run%y", "run*z", "run/a", "runQ", "run_x"]
    assert await blob_store.list("Run") == ["Run/A"]
    assert await blob_store.list("run_") == ["run_x"]
    assert await blob_store.list("run%") == ["run%y"]
    assert await blob_store.list("run*") == ["run*z"]


async def test_unusual_keys_are_plain_strings(blob_store: Any) -> None:
    """Keys with dots, spaces, unicode, ``..`` segments and empty segments are just names."""
    keys = ["a.b", "with space", "ünïcødé/ключ", "../up", "a//b", "dir/", ".hidden", "x" * 300]
    for i, key in enumerate(keys):
        await blob_store.put(key, str(i).encode())
    for i, key in enumerate(keys):
        assert await blob_store.get(key) == str(i).encode()
    assert await blob_store.list() == sorted(keys)
    assert await blob_store.list("a") == ["a.b", "a//b"]


async def test_delete_prefixes_deletes_exactly_the_keys_under_them(blob_store: Any) -> None:
    """``delete_prefixes`` (``BlobRetention``, retention's bulk delete) removes the keys
    that start with a prefix, case-sensitively, and no key that merely shares its
    beginning (``runs/r1/`` is not ``runs/r10/``); it counts what it deleted."""
    for key in [*KEYS, "RUNS/r1/upper", "runs/r1_x/input", "runs/r1%/input"]:
        await blob_store.put(key, b"x")
    assert await blob_store.delete_prefixes(["runs/r1/", "payloads/"]) == 3
    assert await blob_store.delete_prefixes([]) == 0
    assert await blob_store.list() == sorted(
        ["RUNS/r1/upper", "runs/r1%/input", "runs/r10/input", "runs/r1_x/input", "runs/r2/input"]
    )
