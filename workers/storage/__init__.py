"""The one storage layer: local folders, ``s3://`` and ``gs://`` behind one small interface.

Every module that reads or writes outputs or inputs goes through a ``Store`` (a root URI plus a
``pyarrow.fs`` filesystem), so none of them knows which store it talks to. Paths given to a
store's methods are relative to its root and use ``/``.

Besides plain whole-object writes (a PUT on object stores; a write + fsync on disk) and
streamed ones that appear whole on close (``open_stream``: multipart upload; a temporary moved
into place on disk), a store has
three *conditional* primitives, the only ones the commit protocol and the output lease need:

- ``create(rel, data)``: write only if nothing is there yet (S3 ``If-None-Match: *``; on disk a
  fully written, fsynced temporary hard-linked to the name, which fails if the name exists);
- ``read_versioned(rel)``: the bytes, a version token (S3 ETag; on disk a content hash) and the
  object's age by the store's own clock (S3 ``Date`` - ``Last-Modified``; on disk mtime);
- ``replace(rel, data, token)`` / ``delete_if(rel, token)``: only if the token still matches
  (S3 ``If-Match``; on disk under an ``flock`` held while comparing and renaming).

``pyarrow.fs`` cannot send conditional headers, so on S3 those three use boto3 (the same
credential chain). Stores without a conditional primitive here (``gs://``) fall back to
check-then-write, which is safe only while one driver holds the output's lease; see README.

Configuration comes from the standard environment only, never from a job file: credentials
from the provider's default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
instance roles; ``GOOGLE_APPLICATION_CREDENTIALS``), an S3-compatible endpoint from
``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:8333``), the region from ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, a GCS emulator from ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from workers.storage.backends import (
    LocalOps,
    ObjectOps,
    PieceWriter,
    S3Ops,
    StorageError,
    Versioned,
)

__all__ = ["PieceWriter", "StorageError", "StorageOptions", "Store", "Versioned", "is_uri", "join"]

REMOTE_SCHEMES = ("s3", "gs", "gcs")
CHUNK = 1 << 20


def is_uri(path: str) -> bool:
    """True for ``s3://``, ``gs://`` (and ``file://``) locations, False for plain paths."""
    return "://" in path


def join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if rel else base


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret connection settings, read once by the driver and handed to the workers."""

    endpoint_url: str | None = None
    region: str | None = None
    gcs_emulator: str | None = None

    @classmethod
    def from_env(cls) -> StorageOptions:
        env = os.environ.get
        return cls(
            endpoint_url=env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or None,
            region=env("AWS_REGION") or env("AWS_DEFAULT_REGION") or None,
            gcs_emulator=env("STORAGE_EMULATOR_HOST") or None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _s3_fs(opts: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": opts.region or "us-east-1"}
    if opts.endpoint_url:
        parts = urlsplit(opts.endpoint_url)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    return pafs.S3FileSystem(
        **kwargs,
        connect_timeout=5,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def _gcs_fs(opts: StorageOptions) -> pafs.GcsFileSystem:
    if opts.gcs_emulator:
        parts = urlsplit(opts.gcs_emulator if "://" in opts.gcs_emulator else "http://x")
        host = parts.netloc if "://" in opts.gcs_emulator else opts.gcs_emulator
        return pafs.GcsFileSystem(
            anonymous=True,
            endpoint_override=host,
            scheme=parts.scheme or "http",
            retry_time_limit=timedelta(seconds=10),
        )
    return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=60))


class Store:
    """A root location (folder or bucket prefix) and the operations harvest needs on it."""

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions.from_env()
        parts = urlsplit(uri) if is_uri(uri) else None
        scheme = parts.scheme.lower() if parts else "file"
        if scheme == "file":
            root = os.path.abspath(parts.path if parts else uri)
            self.uri, self.root, self.scheme = root, root, "file"
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.ops: ObjectOps = LocalOps(root)
            return
        if parts and (parts.username or parts.password):
            raise StorageError(
                f"{scheme}://{parts.hostname}/...: credentials do not belong in a location; "
                "use the environment or the standard credential chain"
            )
        if scheme not in REMOTE_SCHEMES or not parts or not parts.netloc:
            raise StorageError(f"{uri}: unsupported location (use a path, s3:// or gs://)")
        bucket, prefix = parts.netloc, parts.path.strip("/")
        self.scheme = "gs" if scheme == "gcs" else scheme
        self.root = f"{bucket}/{prefix}" if prefix else bucket
        self.uri = f"{self.scheme}://{self.root}"
        if self.scheme == "s3":
            self.fs = _s3_fs(self.options)
            self.ops = S3Ops(self.uri, self.fs, bucket, prefix, self.options.endpoint_url,
                             self.options.region)  # fmt: skip
        else:
            self.fs = _gcs_fs(self.options)
            self.ops = ObjectOps(self.uri, self.fs, self.root)

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (what pyarrow's ``filesystem=`` APIs take)."""
        return join(self.root, rel)

    def child_uri(self, rel: str) -> str:
        """What a user or another tool would type for ``rel``: a local path or a full URI."""
        return join(self.uri, rel)

    def check(self) -> None:
        """Fail now, in one line naming the location, if the store cannot be used."""
        self.ops.check()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object (readers see all of it or, on disk, a name nothing refers to)."""
        self.ops.put(rel, data)

    def read_bytes(self, rel: str) -> bytes:
        with self.ops.errors(rel), self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def exists(self, rel: str) -> bool:
        with self.ops.errors(rel):
            return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, recursively, as paths relative to the root, sorted."""
        base = self.path(rel)
        with self.ops.errors(rel):
            infos = self.fs.get_file_info(
                pafs.FileSelector(base, recursive=True, allow_not_found=True)
            )
        start = len(self.root.rstrip("/")) + 1
        return sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)

    def delete(self, rel: str) -> None:
        with self.ops.errors(rel):
            try:
                self.fs.delete_file(self.path(rel))
            except FileNotFoundError:
                pass

    def delete_tree(self, rel: str) -> None:
        for name in self.list(rel):
            self.delete(name)

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; False if it did (nothing written)."""
        return self.ops.create(rel, data)

    def read_versioned(self, rel: str) -> Versioned | None:
        return self.ops.read_versioned(rel)

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        """Overwrite ``rel`` if its version is still ``token``; the new token, or None."""
        return self.ops.replace(rel, data, token)

    def delete_if(self, rel: str, token: str) -> bool:
        return self.ops.delete_if(rel, token)

    def open_stream(self, rel: str) -> PieceWriter:
        """A file object for writing ``rel`` piece by piece (e.g. Parquet row groups as they
        come): nothing is visible under ``rel`` until ``close()``, which publishes the whole
        object (durable on disk, like ``write_bytes``); ``abort()`` drops it; ``sha256`` is the
        hash of every byte written."""
        return self.ops.open_stream(rel)

    def write_table(self, table: pa.Table, rel: str, compression: str) -> str:
        """Write ``table`` as one Parquet object; return the sha256 of the bytes stored."""
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=None if compression == "none" else compression)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(rel, data)
        return hashlib.sha256(data).hexdigest()

    def open_input_file(self, rel: str) -> pa.NativeFile:
        """A random-access file (for Parquet readers)."""
        with self.ops.errors(rel):
            return self.fs.open_input_file(self.path(rel))

    def iter_chunks(self, rel: str) -> Iterator[bytes]:
        with self.ops.errors(rel), self.fs.open_input_stream(self.path(rel)) as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def iter_lines(self, rel: str) -> Iterator[bytes]:
        """Lines with their ``\\n`` (the last may lack it), streamed: inputs may be large."""
        rest = b""
        for chunk in self.iter_chunks(rel):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest


@functools.lru_cache(maxsize=64)
def store_for(location: str) -> Store:
    """A shared ``Store`` for a location written to again and again (status file, run log)."""
    return Store(location)


def split_location(location: str) -> tuple[Store, str]:
    """A file location (path or URI) as (store of its folder, its name)."""
    location = location.rstrip("/")
    if is_uri(location):
        head, _, name = location.rpartition("/")
        if head.endswith(":/"):  # s3://bucket: no object name
            raise StorageError(f"{location}: not an object")
        return Store(head), name
    return Store(os.path.dirname(os.path.abspath(location))), os.path.basename(location)
