"""Object storage: the local filesystem or S3, behind one small interface.

Writes are transactions: readers see a whole object or none. Locally that is a write to
a temporary file in the same directory and an atomic rename; on S3 a single PUT (or a
completed multipart upload) only becomes visible once it is complete.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import unquote, urlparse

from maga_tasks.errors import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, MagaError


class StorageError(MagaError):
    """An object could not be read or written (possibly a passing fault: retry)."""

    exit_code = EXIT_UNAVAILABLE
    retryable = True


class ObjectNotFound(StorageError):
    """The object does not exist: bad input, not a passing fault."""

    exit_code = EXIT_BAD_INPUT
    retryable = False


class BadStorageURI(StorageError):
    """A root or URI that names no place this pipeline writes or reads: bad input."""

    exit_code = EXIT_BAD_INPUT
    retryable = False


class Storage(Protocol):
    def exists(self, uri: str) -> bool: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def put_bytes(self, uri: str, data: bytes) -> None: ...
    def put_file(self, uri: str, local_path: str | Path) -> None: ...
    def copy(self, source_uri: str, uri: str) -> None: ...
    def list(self, prefix_uri: str) -> list[str]: ...
    def delete_prefix(self, prefix_uri: str) -> None: ...
    def delete(self, uri: str) -> None: ...
    def local_copy(self, uri: str) -> contextlib.AbstractContextManager[Path]: ...


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with '/', whatever the backend."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


class LocalStorage:
    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def read_bytes(self, uri: str) -> bytes:
        return Path(uri).read_bytes()

    def put_bytes(self, uri: str, data: bytes) -> None:
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def put_file(self, uri: str, local_path: str | Path) -> None:
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(local_path, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def copy(self, source_uri: str, uri: str) -> None:
        if not Path(source_uri).exists():
            raise ObjectNotFound(f"no such file: {source_uri}")
        self.put_file(uri, source_uri)

    def list(self, prefix_uri: str) -> list[str]:
        root = Path(prefix_uri)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))

    def delete_prefix(self, prefix_uri: str) -> None:
        shutil.rmtree(prefix_uri, ignore_errors=True)

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    @contextlib.contextmanager
    def local_copy(self, uri: str) -> Iterator[Path]:
        if not Path(uri).exists():
            raise ObjectNotFound(f"no such file: {uri}")
        yield Path(uri)


@dataclass
class S3Storage:
    endpoint_url: str | None = None
    _client: object | None = None

    @property
    def client(self):
        if self._client is None:
            import boto3  # imported lazily: parsing a DAG must not pay for it

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url or None)
        return self._client

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        return parsed.netloc, parsed.path.lstrip("/")

    def exists(self, uri: str) -> bool:
        bucket, key = self._split(uri)
        try:
            with _s3_failures("stat", uri):
                self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ObjectNotFound:
            return False

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = self._split(uri)
        with _s3_failures("read", uri):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._split(uri)
        with _s3_failures("write", uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def put_file(self, uri: str, local_path: str | Path) -> None:
        bucket, key = self._split(uri)
        with _s3_failures("upload", uri):
            self.client.upload_file(str(local_path), bucket, key)

    def copy(self, source_uri: str, uri: str) -> None:
        """A server-side copy: the new object appears whole, no byte passes through here."""
        source_bucket, source_key = self._split(source_uri)
        bucket, key = self._split(uri)
        with _s3_failures("copy to", uri):
            self.client.copy({"Bucket": source_bucket, "Key": source_key}, bucket, key)

    def list(self, prefix_uri: str) -> list[str]:
        bucket, prefix = self._split(prefix_uri.rstrip("/") + "/")
        keys = []
        with _s3_failures("list", prefix_uri):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix_uri: str) -> None:
        bucket, _ = self._split(prefix_uri)
        keys = [self._split(uri)[1] for uri in self.list(prefix_uri)]
        with _s3_failures("delete under", prefix_uri):
            for start in range(0, len(keys), 1000):
                chunk = [{"Key": key} for key in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": chunk})

    def delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        with _s3_failures("delete", uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    @contextlib.contextmanager
    def local_copy(self, uri: str) -> Iterator[Path]:
        kept = _kept_copies.get()
        if kept is not None and uri in kept.uris:
            yield kept.path(uri, self._download)
            return
        with tempfile.TemporaryDirectory(prefix="maga-s3-") as tmp:
            target = Path(tmp) / Path(uri).name
            self._download(uri, target)
            yield target

    def _download(self, uri: str, target: Path) -> None:
        bucket, key = self._split(uri)
        with _s3_failures("download", uri):
            self.client.download_file(bucket, key, str(target))


class _KeptCopies:
    """Local copies of some objects, downloaded on first use and kept until the
    `read_once` block ends."""

    def __init__(self, uris: set[str], folder: Path):
        self.uris = uris
        self.folder = folder
        self._paths: dict[str, Path] = {}

    def path(self, uri: str, download) -> Path:
        if uri not in self._paths:
            target = self.folder / f"{len(self._paths)}-{Path(uri).name}"
            download(uri, target)
            self._paths[uri] = target
        return self._paths[uri]


_kept_copies: contextvars.ContextVar[_KeptCopies | None] = contextvars.ContextVar("maga_kept_copies", default=None)


@contextlib.contextmanager
def read_once(*uris: str) -> Iterator[None]:
    """Within the block, every `local_copy` of these S3 objects shares one download,
    made on first use and deleted when the block ends: a task that reads its source
    shard in several steps (input gate, expansion, judge) downloads it once. Local
    files are read in place anyway."""
    remote = {uri for uri in uris if is_s3(uri)}
    if not remote:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="maga-source-") as tmp:
        reset = _kept_copies.set(_KeptCopies(remote, Path(tmp)))
        try:
            yield
        finally:
            _kept_copies.reset(reset)


@contextlib.contextmanager
def _s3_failures(action: str, uri: str) -> Iterator[None]:
    """boto3 raises many kinds (client, connection, transfer errors): callers get
    `ObjectNotFound` or a `StorageError` naming the object."""
    try:
        yield
    except Exception as error:
        if _is_not_found(error):
            raise ObjectNotFound(f"no such object: {uri}") from None
        raise StorageError(f"cannot {action} {uri}: {error}") from None


def _is_not_found(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def storage_root(uri: str) -> str:
    """A source or output root as given (CLI, DAG param) in the form the backends use:
    `s3://bucket/prefix` as it is, `file:///abs/path` as `/abs/path`, a plain path as it
    is. A `file://` URL naming a host, and any other scheme, are refused (BadStorageURI):
    read as a relative path they would write under `./file:` or `./ftp:`."""
    uri = str(uri).strip()
    if is_s3(uri):
        if not urlparse(uri).netloc:
            raise BadStorageURI(f"an s3:// root needs a bucket: {_shown_uri(uri)}")
        return uri
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/") or parsed.query or parsed.fragment:
            raise BadStorageURI(f"a file:// root must be file:///absolute/path: {_shown_uri(uri)}")
        return unquote(parsed.path)
    if "://" in uri:
        raise BadStorageURI(f"unsupported storage URI scheme (want a local path, file:/// or s3://): {_shown_uri(uri)}")
    if not uri:
        raise BadStorageURI("a storage root is empty")
    return uri


def _shown_uri(uri: str) -> str:
    from maga_tasks.redaction import redact_url, strip_control

    return strip_control(redact_url(uri))[:300]


def storage_for(uri: str, s3_endpoint_url: str | None = None) -> Storage:
    """The backend for a URI: `s3://bucket/key` or a local path (`storage_root` turns the
    roots users give into one of the two).

    The S3 endpoint comes from the argument, else `MAGA_S3_ENDPOINT_URL`, else boto3's
    own configuration (`AWS_ENDPOINT_URL`, profiles); credentials always from boto3's.
    """
    if is_s3(uri):
        return S3Storage(endpoint_url=s3_endpoint_url or os.environ.get("MAGA_S3_ENDPOINT_URL"))
    if "://" in uri or uri.startswith("file:"):
        raise BadStorageURI(f"not a local path or s3:// URI: {_shown_uri(uri)}")
    return LocalStorage()
