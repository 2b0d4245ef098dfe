"""``Store``: the interface every store kind implements, and its generic implementation over a
``pyarrow.fs`` filesystem (used as is for ``gs://``; ``local`` and ``s3`` override what their
store does better). Paths given to a store's methods are relative to its root and use ``/``."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs

from workers.storage.errors import StorageError, mapped

CHUNK = 1 << 20
TMP_PREFIX = ".tmp-"


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
        import os

        env = os.environ.get
        return cls(
            endpoint_url=env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or None,
            region=env("AWS_REGION") or env("AWS_DEFAULT_REGION") or None,
            gcs_emulator=env("STORAGE_EMULATOR_HOST") or None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Versioned:
    data: bytes
    token: str  # changes on every write
    age_s: float  # since the last write, by the store's own clock


class PieceWriter:
    """A binary, write-only file object for one object written in pieces (a Parquet writer's
    sink): small writes are gathered into ``BLOCK``-sized ones, every byte is hashed on the way,
    and ``close`` publishes the object whole. ``abort`` drops it instead."""

    BLOCK = 1 << 20

    def __init__(self, store: Store, rel: str, fh: Any, tmp: str | None = None) -> None:
        self.store, self.rel, self.fh, self.tmp = store, rel, fh, tmp
        self.sha = hashlib.sha256()
        self.size = 0
        self._pending = bytearray()
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        self.sha.update(data)
        self._pending += data
        self.size += n
        if len(self._pending) >= self.BLOCK:
            self._drain()
        return n

    def _drain(self) -> None:
        with self.store.errors(self.rel):
            self.fh.write(self._pending)
        self._pending = bytearray()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass  # bytes reach the store at BLOCK boundaries and on close; nothing reads them sooner

    def close(self) -> None:
        """Publish the whole object (durable on disk when this returns)."""
        if self.closed:
            return
        self._drain()
        with self.store.errors(self.rel):
            self.store._publish(self)
        self.closed = True

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.store._discard(self)

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()


class Store:
    """A root location (folder or bucket prefix) and the operations harvest needs on it.

    Made by ``workers.storage.open_store(uri)``. This class is also the implementation for
    object stores reached through ``pyarrow.fs`` alone, with no conditional requests:
    ``create``, ``replace`` and ``delete_if`` check, then write, so two drivers could both
    write; callers rely on the output lease to keep a second driver away (``gs://``).
    """

    scheme: ClassVar[str] = "gs"

    def __init__(self, uri: str, root: str, fs: pafs.FileSystem, options: StorageOptions) -> None:
        self.uri, self.root, self.fs, self.options = uri, root, fs, options

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (what pyarrow's ``filesystem=`` APIs take)."""
        return join(self.root, rel)

    def child_uri(self, rel: str) -> str:
        """What a user or another tool would type for ``rel``: a local path or a full URI."""
        return join(self.uri, rel)

    def errors(self, rel: str = "") -> contextlib.AbstractContextManager[None]:
        """Storage errors inside become one ``StorageError`` naming ``rel``'s location."""
        return mapped(self.child_uri(rel))

    # ---- whole objects -------------------------------------------------------------------

    def check(self) -> None:
        """Fail now, in one line naming the location, if the store cannot be used: the root's
        bucket exists and answers with these credentials."""
        bucket = self.root.split("/", 1)[0]
        with self.errors():
            info = self.fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: the bucket {bucket!r} does not exist")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object (readers see all of it or, on disk, a name nothing refers to)."""
        with self.errors(rel), self.fs.open_output_stream(self.path(rel)) as fh:
            fh.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.errors(rel), self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def exists(self, rel: str) -> bool:
        with self.errors(rel):
            return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, recursively, as paths relative to the root, sorted."""
        with self.errors(rel):
            infos = self.fs.get_file_info(
                pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
            )
        start = len(self.root.rstrip("/")) + 1
        return sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)

    def delete(self, rel: str) -> None:
        with self.errors(rel):
            try:
                self.fs.delete_file(self.path(rel))
            except FileNotFoundError:
                pass

    def delete_dead_temporaries(self, rel: str) -> list[str]:
        """Delete the write temporaries under ``rel`` but this process's writes under way, and
        return them: run by the lease holder, the only writer there, they are what a writer
        that died left (object stores write whole objects and leave none)."""
        gone = []
        for name in self.list(rel):
            if name.rsplit("/", 1)[-1].startswith(TMP_PREFIX) and not self.is_live_temporary(name):
                self.delete(name)
                gone.append(name)
        return gone

    def is_live_temporary(self, rel: str) -> bool:
        """Whether ``rel`` is a temporary of a write under way in this process."""
        return False

    def delete_tree(self, rel: str) -> None:
        for name in self.list(rel):
            self.delete(name)

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
        with self.errors(rel):
            return self.fs.open_input_file(self.path(rel))

    def iter_chunks(self, rel: str) -> Iterator[bytes]:
        with self.errors(rel), self.fs.open_input_stream(self.path(rel)) as fh:
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

    # ---- streamed objects ----------------------------------------------------------------

    def open_stream(self, rel: str) -> PieceWriter:
        """A file object for writing ``rel`` piece by piece (e.g. Parquet row groups as they
        come): nothing is visible under ``rel`` until ``close()``, which publishes the whole
        object (durable on disk, like ``write_bytes``); ``abort()`` drops it; ``sha256`` is the
        hash of every byte written. Here: an object store's multipart or resumable upload."""
        with self.errors(rel):
            return PieceWriter(self, rel, self.fs.open_output_stream(self.path(rel)))

    def _publish(self, writer: PieceWriter) -> None:
        writer.fh.close()

    def _discard(self, writer: PieceWriter) -> None:
        """A stream given up on: whatever reached the store is an uncommitted orphan anyway;
        delete it if it became visible (best effort, ``harvest run`` sweeps the rest)."""
        with contextlib.suppress(Exception):
            writer.fh.close()
        with contextlib.suppress(Exception):
            self.fs.delete_file(self.path(writer.rel))

    # ---- conditional writes (the commit protocol and the output lease) --------------------

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; False if it did (nothing written)."""
        with self.errors(rel):
            if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound:
                return False
        self.write_bytes(rel, data)
        return True

    def read_versioned(self, rel: str) -> Versioned | None:
        """The bytes, a version token and the object's age by the store's clock; None if absent."""
        with self.errors(rel):
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.NotFound:
                return None
            with self.fs.open_input_stream(self.path(rel)) as fh:
                data = fh.read()
        age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
        return Versioned(data, hashlib.sha256(data).hexdigest(), age)

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        """Overwrite ``rel`` if its version is still ``token``; the new token, or None."""
        now = self.read_versioned(rel)
        if now is None or now.token != token:
            return None
        self.write_bytes(rel, data)
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, rel: str, token: str) -> bool:
        """Delete ``rel`` if its version is still ``token``: read, compare, delete (S3-compatible
        stores do not all honour If-Match on DELETE either; a holder deletes only its own lease,
        so the window only matters after a takeover race)."""
        now = self.read_versioned(rel)
        if now is None or now.token != token:
            return False
        self.delete(rel)  # gone meanwhile is as good as deleted
        return True
