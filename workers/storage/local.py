"""A local folder as a store: fsynced writes, create by hard link, flock'd compare-and-swap.

``flock`` makes compare-and-swap atomic between processes of one host, which is what a local
folder is; network filesystems should be used through their object-store API.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import ClassVar

import pyarrow.fs as pafs

from workers.storage.base import TMP_PREFIX, PieceWriter, StorageOptions, Store, Versioned

# This process's write temporaries while their write is under way (absolute paths): what a
# sweep run by this process beside its own writes (the lease's heartbeat, the status file)
# must leave alone. Any other temporary under the lease holder's META was left by a writer
# that died. Set operations are atomic under the GIL.
_LIVE: set[str] = set()


def _new_temporary(path: str) -> str:
    """A fresh temporary's name beside ``path``, registered live before it exists."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}")
    _LIVE.add(tmp)
    return tmp


@contextlib.contextmanager
def _temporary(path: str) -> Iterator[str]:
    tmp = _new_temporary(path)
    try:
        yield tmp
    finally:
        _LIVE.discard(tmp)


class LocalStore(Store):
    scheme: ClassVar[str] = "file"

    def __init__(self, root: str, options: StorageOptions) -> None:
        super().__init__(root, root, pafs.LocalFileSystem(), options)

    def check(self) -> None:
        with self.errors():
            os.makedirs(self.root, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise PermissionError(f"{self.root} is not writable")

    @contextlib.contextmanager
    def _written_tmp(self, rel: str, data: bytes) -> Iterator[str]:
        """A fsynced temporary beside ``rel`` holding ``data``, live while the block runs."""
        with _temporary(self.path(rel)) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            yield tmp

    def is_live_temporary(self, rel: str) -> bool:
        return self.path(rel) in _LIVE

    def _sync_dir(self, rel: str) -> None:
        fd = os.open(os.path.dirname(self.path(rel)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Like an object store's PUT: readers see the old object or the whole new one (a
        fsynced temporary moved over the name), and it is durable when this returns."""
        with self.errors(rel), self._written_tmp(rel, data) as tmp:
            try:
                os.replace(tmp, self.path(rel))
            except BaseException:
                os.unlink(tmp)
                raise
            self._sync_dir(rel)

    def open_stream(self, rel: str) -> PieceWriter:
        """Pieces go to a temporary beside ``rel``; ``close`` fsyncs it and moves it into place,
        so readers never see a partial file under the name (``harvest run`` sweeps leftovers)."""
        with self.errors(rel):
            tmp = _new_temporary(self.path(rel))
            try:
                return PieceWriter(self, rel, open(tmp, "wb"), tmp)  # closed: publish or discard
            except BaseException:
                _LIVE.discard(tmp)
                raise

    def _publish(self, writer: PieceWriter) -> None:
        assert writer.tmp is not None
        writer.fh.flush()
        os.fsync(writer.fh.fileno())
        writer.fh.close()
        try:
            os.replace(writer.tmp, self.path(writer.rel))
        finally:
            _LIVE.discard(writer.tmp)
        self._sync_dir(writer.rel)

    def _discard(self, writer: PieceWriter) -> None:
        with contextlib.suppress(OSError):
            writer.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(writer.tmp or "")
        _LIVE.discard(writer.tmp or "")

    def create(self, rel: str, data: bytes) -> bool:
        """A fully written, fsynced temporary hard-linked to the name: fails if the name exists."""
        with self.errors(rel), self._written_tmp(rel, data) as tmp:
            try:
                os.link(tmp, self.path(rel))
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            self._sync_dir(rel)
            return True

    @contextlib.contextmanager
    def _locked(self, rel: str) -> Iterator[None]:
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield

    def read_versioned(self, rel: str) -> Versioned | None:
        """The token is a content hash, the age the file's mtime."""
        with self.errors(rel):
            try:
                with open(self.path(rel), "rb") as fh:
                    data = fh.read()
                    mtime = os.fstat(fh.fileno()).st_mtime
            except FileNotFoundError:
                return None
        return Versioned(data, hashlib.sha256(data).hexdigest(), time.time() - mtime)

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        """Compare and rename under the name's ``flock``."""
        with self.errors(rel), self._locked(rel):
            now = self.read_versioned(rel)
            if now is None or now.token != token:
                return None
            with self._written_tmp(rel, data) as tmp:
                os.replace(tmp, self.path(rel))
            self._sync_dir(rel)
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, rel: str, token: str) -> bool:
        """Compare and unlink under the name's ``flock``."""
        with self.errors(rel), self._locked(rel):
            now = self.read_versioned(rel)
            if now is None or now.token != token:
                return False
            os.unlink(self.path(rel))
        return True
