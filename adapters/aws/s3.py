"""``S3BlobStore``: the BlobStore port on an S3 bucket (or an S3-compatible store).

Artifacts and offloaded payloads live under ``prefix`` in ``bucket``, while the
database keeps their keys. A Treadle key ``runs/r1/out`` is the object
``<prefix>runs/r1/out``: the bucket stays browsable, and a prefix listing of the
port is a prefix listing of S3. S3 limits an object key to 1,024 bytes of UTF-8, so
a longer key (prefix included) is refused with a ``ValueError`` naming it (Treadle's
own keys are far shorter).

boto3 is synchronous, so each call runs in a worker thread (``asyncio.to_thread``);
a boto3 client is thread-safe. boto3 is imported only when no ``client`` is given
(the ``aws`` extra), never at import. A missing object is ``KeyError`` (the port's
contract); every other failure (no such bucket, access denied, endpoint
unreachable) is a ``StorageError`` naming the bucket and the key, so a stage or a
flush fails with a message an operator can act on.

Server-side encryption: ``sse="AES256"`` (SSE-S3) or ``sse="aws:kms"`` with an
optional ``kms_key_id`` (SSE-KMS; without a key id the bucket's AWS-managed key).
The settings apply to every ``put``; reads need nothing (S3 decrypts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from treadle.kernel.errors import StorageError, TransientStorageError

__all__ = ["S3BlobStore", "S3Client"]

MAX_KEY_BYTES = 1024
"""S3's limit on an object key's UTF-8 length."""

_DELETE_BATCH = 1000
"""``DeleteObjects`` takes at most 1,000 keys per request."""

_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_TRANSIENT = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500"}
)

Sse = Literal["AES256", "aws:kms"]


class S3Client(Protocol):
    """The boto3 S3 client methods this store calls (``boto3.client("s3")``)."""

    def put_object(self, **kwargs: Any) -> Any: ...

    def get_object(self, **kwargs: Any) -> Any: ...

    def head_object(self, **kwargs: Any) -> Any: ...

    def head_bucket(self, **kwargs: Any) -> Any: ...

    def delete_object(self, **kwargs: Any) -> Any: ...

    def delete_objects(self, **kwargs: Any) -> Any: ...

    def get_paginator(self, operation_name: str) -> Any: ...


class S3BlobStore:
    """Named bytes in ``s3://bucket/prefix`` (see the module docstring).

    ``client``: a boto3 S3 client (or anything with its methods); default
    ``boto3.client("s3", region_name=region, endpoint_url=endpoint_url)``, credentials
    from boto3's usual chain (env, profile, instance role). ``page_size`` is how many
    keys one ``ListObjectsV2`` page asks for (S3 returns at most 1,000).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        sse: Sse | None = None,
        kms_key_id: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        page_size: int = 1000,
    ) -> None:
        given: tuple[object, object, object] = (bucket, prefix, page_size)  # runtime checks
        if not isinstance(given[0], str) or not bucket or "/" in bucket:
            raise ValueError(f"S3BlobStore: bucket must be a bucket name, got {bucket!r}")
        if not isinstance(given[1], str):
            raise ValueError(f"S3BlobStore: prefix must be a string, got {prefix!r}")
        if kms_key_id is not None and sse is None:
            sse = "aws:kms"
        if sse not in (None, "AES256", "aws:kms"):
            raise ValueError(f"S3BlobStore: sse must be 'AES256' or 'aws:kms', got {sse!r}")
        if kms_key_id is not None and sse != "aws:kms":
            raise ValueError("S3BlobStore: kms_key_id needs sse='aws:kms'")
        if isinstance(given[2], bool) or not isinstance(given[2], int) or page_size < 1:
            raise ValueError(
                f"S3BlobStore: page_size must be a positive integer, got {page_size!r}"
            )
        self.bucket = bucket
        self.prefix = prefix
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.page_size = min(page_size, 1000)
        self.client: S3Client = (
            client if client is not None else _boto3_client(region, endpoint_url)
        )

    @classmethod
    def from_url(cls, url: str, *, client: S3Client | None = None) -> S3BlobStore:
        """``s3://bucket/prefix`` with optional query parameters ``region``,
        ``endpoint_url`` (MinIO, LocalStack, moto), ``sse`` (``AES256`` or ``aws:kms``),
        ``kms_key_id`` and ``page_size``. A prefix given without a trailing ``/`` gets
        one, so ``s3://b/treadle`` stores ``treadle/runs/...``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ValueError(f"not an S3 URL: {url!r} (use s3://bucket/prefix)")
        prefix = unquote(parts.path.lstrip("/"))
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        params: dict[str, str] = dict(parse_qsl(parts.query, keep_blank_values=False))
        known = {"region", "endpoint_url", "sse", "kms_key_id", "page_size"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} in S3 URL s3://{parts.netloc}/...: "
                f"accepted are {', '.join(sorted(known))}"
            )
        page_size = params.get("page_size", "1000")
        if not page_size.isdigit():
            raise ValueError(
                f"page_size in an S3 URL must be a positive integer, got {page_size!r}"
            )
        sse = params.get("sse")
        return cls(
            parts.netloc,
            prefix,
            client=client,
            sse=sse,  # type: ignore[arg-type]  # checked by __init__
            kms_key_id=params.get("kms_key_id"),
            region=params.get("region"),
            endpoint_url=params.get("endpoint_url"),
            page_size=int(page_size),
        )

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix})"

    # -- keys -----------------------------------------------------------------------
    def object_key(self, key: str) -> str:
        """The S3 object key that holds ``key``."""
        if not isinstance(key, str):
            raise TypeError(f"blob key must be a string, got {type(key).__name__}")
        full = self.prefix + key
        if len(full.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise ValueError(
                f"blob key {key[:60]!r}... is too long for S3: {MAX_KEY_BYTES} bytes at most, "
                "prefix included"
            )
        return full

    def _error(self, exc: Exception, action: str, key: str | None = None) -> StorageError:
        where = f"s3://{self.bucket}/{self.prefix}{key if key is not None else ''}"
        code = _error_code(exc)
        kind = TransientStorageError if code in _TRANSIENT or _is_connection(exc) else StorageError
        return kind(f"S3 {action} of {where} failed: {type(exc).__name__}: {exc}")

    # -- blocking helpers (run in a thread) -------------------------------------------
    def _put(self, key: str, data: bytes) -> None:
        extra: dict[str, str] = {}
        if self.sse is not None:
            extra["ServerSideEncryption"] = self.sse
        if self.kms_key_id is not None:
            extra["SSEKMSKeyId"] = self.kms_key_id
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data, **extra)
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            raise self._error(exc, "put", key) from exc

    def _get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
            body = response["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            if _error_code(exc) in _MISSING:
                raise KeyError(f"no blob with key {key!r}") from None
            raise self._error(exc, "get", key) from exc

    def _has(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except (ValueError, TypeError):
            raise
        except Exception as exc:
            if _error_code(exc) in _MISSING:
                return False
            raise self._error(exc, "head", key) from exc
        return True

    def _delete(self, key: str) -> bool:
        # S3's DeleteObject succeeds whether or not the object existed, and the port
        # reports which: a HEAD first (racing deleters may both see True; harmless).
        existed = self._has(key)
        if existed:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
            except Exception as exc:
                raise self._error(exc, "delete", key) from exc
        return existed

    def _list(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        start = len(self.prefix)
        keys: list[str] = []
        try:
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=self.prefix + prefix,
                PaginationConfig={"PageSize": self.page_size},
            )
            for page in pages:
                keys.extend(item["Key"][start:] for item in page.get("Contents", ()))
        except Exception as exc:
            raise self._error(exc, "list", prefix) from exc
        return sorted(keys)

    def _delete_many(self, keys: Sequence[str]) -> int:
        deleted = 0
        for offset in range(0, len(keys), _DELETE_BATCH):
            chunk = keys[offset : offset + _DELETE_BATCH]
            objects = [{"Key": self.object_key(key)} for key in chunk]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
            except Exception as exc:
                raise self._error(exc, "delete", chunk[0]) from exc
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 delete of {len(errors)} object(s) in s3://{self.bucket} failed: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
            deleted += len(chunk)
        return deleted

    def _probe(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._error(exc, "head-bucket") from exc

    # -- the port -----------------------------------------------------------------------
    async def put(self, key: str, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"blob {key!r}: data must be bytes, got {type(data).__name__}")
        await asyncio.to_thread(self._put, key, bytes(data))

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._get, key)

    async def has(self, key: str) -> bool:
        return await asyncio.to_thread(self._has, key)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self._delete, key)

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    async def delete_prefixes(self, prefixes: Sequence[str]) -> int:
        """Delete every blob under any of ``prefixes`` (``BlobRetention``): one listing
        per prefix, then ``DeleteObjects`` in batches of 1,000; returns how many."""
        wanted = sorted({prefix for prefix in prefixes if prefix})
        if not wanted:
            return 0

        def sweep() -> int:
            keys: set[str] = set()
            for prefix in wanted:
                keys.update(self._list(prefix))
            return self._delete_many(sorted(keys))

        return await asyncio.to_thread(sweep)

    async def check(self) -> None:
        """Raise a ``StorageError`` unless the bucket exists and these credentials may
        reach it (``HeadBucket``); ``treadle doctor`` calls it."""
        await asyncio.to_thread(self._probe)


def _boto3_client(region: str | None, endpoint_url: str | None) -> S3Client:
    try:
        import boto3
    except ImportError as exc:
        raise StorageError("the S3 blob store needs boto3: pip install 'treadle[aws]'") from exc
    options: dict[str, Any] = {}
    if region:
        options["region_name"] = region
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    client: S3Client = boto3.client("s3", **options)
    return client


def _error_code(exc: BaseException) -> str | None:
    response: object = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error")
        if isinstance(error, Mapping):
            code = error.get("Code")
            return None if code is None else str(code)
    return None


def _is_connection(exc: BaseException) -> bool:
    """botocore's endpoint and timeout errors, recognised by name (no botocore import)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
        }
    )
