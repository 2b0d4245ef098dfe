"""The one storage layer: local folders, ``s3://`` and ``gs://`` behind one interface.

Every module that reads or writes outputs or inputs goes through a ``Store`` made by
``open_store(uri)`` (a root plus a ``pyarrow.fs`` filesystem), so none of them knows which
store it talks to. One module per store kind: ``base`` (the interface, and the generic
implementation ``gs://`` uses), ``local``, ``s3``, ``gcs``; ``errors`` maps every SDK's failures
to ``StorageError``.

Besides plain whole-object writes (a PUT on object stores; a write + fsync on disk) and
streamed ones that appear whole on close (``open_stream``: multipart upload; a temporary moved
into place on disk), a store has three *conditional* primitives, the only ones the commit
protocol and the output lease need:

- ``create(rel, data)``: write only if nothing is there yet (S3 ``If-None-Match: *``; on disk a
  fully written, fsynced temporary hard-linked to the name, which fails if the name exists);
- ``read_versioned(rel)``: the bytes, a version token (S3 ETag; on disk a content hash) and the
  object's age by the store's own clock (S3 ``Date`` - ``Last-Modified``; on disk mtime);
- ``replace(rel, data, token)`` / ``delete_if(rel, token)``: only if the token still matches
  (S3 ``If-Match``; on disk under an ``flock`` held while comparing and renaming).

Stores without a conditional primitive here (``gs://``) fall back to check-then-write, which is
safe only while one driver holds the output's lease; see README.

Configuration comes from the standard environment only, never from a job file: credentials
from the provider's default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
instance roles; ``GOOGLE_APPLICATION_CREDENTIALS``), an S3-compatible endpoint from
``AWS_ENDPOINT_URL`` (e.g. ``http://127.0.0.1:8333``), the region from ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, a GCS emulator from ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import functools
import os
from urllib.parse import urlsplit

from workers.storage.base import TMP_PREFIX, PieceWriter, StorageOptions, Store, Versioned, join
from workers.storage.errors import StorageError

__all__ = [
    "TMP_PREFIX",
    "PieceWriter",
    "StorageError",
    "StorageOptions",
    "Store",
    "Versioned",
    "is_uri",
    "join",
    "open_store",
    "split_location",
    "store_for",
]

REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_uri(path: str) -> bool:
    """True for ``s3://``, ``gs://`` (and ``file://``) locations, False for plain paths."""
    return "://" in path


def open_store(uri: str, options: StorageOptions | None = None) -> Store:
    """The store for a location: a folder path (or ``file://``), ``s3://bucket/prefix`` or
    ``gs://bucket/prefix``. Settings come from ``options``, else the environment."""
    options = options or StorageOptions.from_env()
    parts = urlsplit(uri) if is_uri(uri) else None
    scheme = parts.scheme.lower() if parts else "file"
    if scheme == "file":
        from workers.storage.local import LocalStore

        return LocalStore(os.path.abspath(parts.path if parts else uri), options)
    if parts and (parts.username or parts.password):
        raise StorageError(
            f"{scheme}://{parts.hostname}/...: credentials do not belong in a location; "
            "use the environment or the standard credential chain"
        )
    if scheme not in REMOTE_SCHEMES or not parts or not parts.netloc:
        raise StorageError(f"{uri}: unsupported location (use a path, s3:// or gs://)")
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if scheme == "s3":
        from workers.storage.s3 import S3Store

        return S3Store(bucket, prefix, options)
    from workers.storage.gcs import GcsStore

    return GcsStore(bucket, prefix, options)


@functools.lru_cache(maxsize=64)
def store_for(location: str) -> Store:
    """A shared store for a location written to again and again (status file, run log)."""
    return open_store(location)


def split_location(location: str) -> tuple[Store, str]:
    """A file location (path or URI) as (store of its folder, its name)."""
    location = location.rstrip("/")
    if is_uri(location):
        head, _, name = location.rpartition("/")
        if head.endswith(":/"):  # s3://bucket: no object name
            raise StorageError(f"{location}: not an object")
        return open_store(head), name
    return open_store(os.path.dirname(os.path.abspath(location))), os.path.basename(location)
