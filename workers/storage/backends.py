"""Per-store implementations of whole-object and conditional writes (see ``workers.storage``).

Errors leave this module as ``StorageError``: one line naming the URI and what went wrong, never
a credential (messages are built here from error codes, not copied from the SDKs).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

TMP_PREFIX = ".tmp-"


class StorageError(OSError):
    """A store cannot be used; the message names the location, never a secret."""


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

    def __init__(self, ops: ObjectOps, rel: str, fh: Any, tmp: str | None = None) -> None:
        self.ops, self.rel, self.fh, self.tmp = ops, rel, fh, tmp
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
        with self.ops.errors(self.rel):
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
        with self.ops.errors(self.rel):
            self.ops.publish(self)
        self.closed = True

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.ops.discard(self)

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()


_ACCESS = "access denied: check the credentials in the environment"
_NO_BUCKET = "the bucket does not exist"
_UNREACHABLE = "cannot reach the storage endpoint"
_NO_CREDENTIALS = "no credentials in the environment or the standard credential chain"
_ACCESS_CODES = frozenset(
    ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken",
     "ExpiredToken", "Forbidden", "403")
)  # fmt: skip


def _reason(err: BaseException) -> str:
    """A short, secret-free description of a storage failure: from the SDK's structured error
    (boto3's class and S3 error code) where there is one, else from pyarrow.fs's text."""
    reason = _boto_reason(err)
    if reason is None and isinstance(err, ConnectionError | TimeoutError):
        reason = _UNREACHABLE
    if reason is None and isinstance(err, OSError):
        reason = _pyarrow_reason(str(err))
    return reason or type(err).__name__


def _boto_reason(err: BaseException) -> str | None:
    """boto3 (botocore) failures by class and by the S3 error code in the response."""
    module = type(err).__module__ or ""
    if not module.startswith("botocore"):
        return None
    from botocore import exceptions as bx

    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _ACCESS_CODES or status == 403:
            return _ACCESS
        if code == "NoSuchBucket":
            return _NO_BUCKET
        return code or type(err).__name__
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return _NO_CREDENTIALS
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return _UNREACHABLE
    if isinstance(err, bx.ConnectionClosedError):
        return _UNREACHABLE
    return None


def _pyarrow_reason(text: str) -> str | None:
    """pyarrow.fs raises plain OSErrors (S3 and GCS alike) whose only detail is their message,
    in which the C++ SDK writes its error name or curl code: matching that text is all there
    is, so it is done here alone, for those errors alone."""
    table = (
        (("ACCESS_DENIED", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId",
          "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "403", "Forbidden",
          "InvalidToken", "ExpiredToken"), _ACCESS),
        (("NoSuchBucket", "NO_SUCH_BUCKET", "bucket does not exist"), _NO_BUCKET),
        (("NETWORK_CONNECTION", "Could not connect", "Connection refused", "curlCode",
          "Couldn't connect", "timed out", "Timeout"), _UNREACHABLE),
        (("Unable to locate credentials",), _NO_CREDENTIALS),
    )  # fmt: skip
    for needles, reason in table:
        if any(n in text for n in needles):
            return reason
    return None


class ObjectOps:
    """Object-store operations over ``pyarrow.fs`` alone (no conditional request support).

    ``create`` checks for the name, then writes: two drivers could both write, so callers rely
    on the output lease to keep a second driver away. Used for ``gs://``.
    """

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str) -> None:
        self.uri, self.fs, self.root = uri, fs, root

    def path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    @contextlib.contextmanager
    def errors(self, rel: str = "") -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except StorageError:
            raise
        except Exception as err:
            if not _is_storage_error(err):
                raise
            where = f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri
            raise StorageError(f"{where}: {_reason(err)}") from None

    def check(self) -> None:
        """The root's bucket exists and answers with these credentials."""
        bucket = self.root.split("/", 1)[0]
        with self.errors():
            info = self.fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: the bucket {bucket!r} does not exist")

    def put(self, rel: str, data: bytes) -> None:
        with self.errors(rel), self.fs.open_output_stream(self.path(rel)) as fh:
            fh.write(data)

    def open_stream(self, rel: str) -> PieceWriter:
        """An object written piece by piece; it appears under ``rel`` only once closed (an
        object store's multipart or resumable upload)."""
        with self.errors(rel):
            return PieceWriter(self, rel, self.fs.open_output_stream(self.path(rel)))

    def publish(self, writer: PieceWriter) -> None:
        writer.fh.close()

    def discard(self, writer: PieceWriter) -> None:
        """A stream given up on: whatever reached the store is an uncommitted orphan anyway;
        delete it if it became visible (best effort, ``harvest run`` sweeps the rest)."""
        with contextlib.suppress(Exception):
            writer.fh.close()
        with contextlib.suppress(Exception):
            self.fs.delete_file(self.path(writer.rel))

    def create(self, rel: str, data: bytes) -> bool:
        with self.errors(rel):
            if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound:
                return False
        self.put(rel, data)
        return True

    def read_versioned(self, rel: str) -> Versioned | None:
        with self.errors(rel):
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.NotFound:
                return None
            with self.fs.open_input_stream(self.path(rel)) as fh:
                data = fh.read()
        age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
        return Versioned(data, hashlib.sha256(data).hexdigest(), age)

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        now = self.read_versioned(rel)
        if now is None or now.token != token:
            return None
        self.put(rel, data)
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, rel: str, token: str) -> bool:
        now = self.read_versioned(rel)
        if now is None or now.token != token:
            return False
        with self.errors(rel):
            self.fs.delete_file(self.path(rel))
        return True


def _is_storage_error(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    module = type(err).__module__ or ""
    return module.startswith(("botocore", "boto3", "pyarrow", "urllib3"))


class LocalOps(ObjectOps):
    """A local folder: fsynced writes, O_EXCL-style create by hard link, flock'd compare-and-swap.

    ``flock`` makes compare-and-swap atomic between processes of one host, which is what a
    local folder is; network filesystems should be used through their object-store API.
    """

    def __init__(self, root: str) -> None:
        super().__init__(root, pafs.LocalFileSystem(), root)

    def check(self) -> None:
        with self.errors():
            os.makedirs(self.root, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise PermissionError(f"{self.root} is not writable")

    def _write_tmp(self, rel: str, data: bytes) -> str:
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _sync_dir(self, rel: str) -> None:
        fd = os.open(os.path.dirname(self.path(rel)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open_stream(self, rel: str) -> PieceWriter:
        """Pieces go to a temporary beside ``rel``; ``close`` fsyncs it and moves it into place,
        so readers never see a partial file under the name (``harvest run`` sweeps leftovers)."""
        path = self.path(rel)
        with self.errors(rel):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}")
            return PieceWriter(self, rel, open(tmp, "wb"), tmp)  # closed by publish or discard

    def publish(self, writer: PieceWriter) -> None:
        assert writer.tmp is not None
        writer.fh.flush()
        os.fsync(writer.fh.fileno())
        writer.fh.close()
        os.replace(writer.tmp, self.path(writer.rel))
        self._sync_dir(writer.rel)

    def discard(self, writer: PieceWriter) -> None:
        with contextlib.suppress(OSError):
            writer.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(writer.tmp or "")

    def put(self, rel: str, data: bytes) -> None:
        """Like an object store's PUT: readers see the old object or the whole new one (a
        fsynced temporary moved over the name), and it is durable when this returns."""
        with self.errors(rel):
            tmp = self._write_tmp(rel, data)
            try:
                os.replace(tmp, self.path(rel))
            except BaseException:
                os.unlink(tmp)
                raise
            self._sync_dir(rel)

    def create(self, rel: str, data: bytes) -> bool:
        with self.errors(rel):
            tmp = self._write_tmp(rel, data)
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
        with self.errors(rel):
            try:
                with open(self.path(rel), "rb") as fh:
                    data = fh.read()
                    mtime = os.fstat(fh.fileno()).st_mtime
            except FileNotFoundError:
                return None
        return Versioned(data, hashlib.sha256(data).hexdigest(), time.time() - mtime)

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        with self.errors(rel), self._locked(rel):
            now = self.read_versioned(rel)
            if now is None or now.token != token:
                return None
            os.replace(self._write_tmp(rel, data), self.path(rel))
            self._sync_dir(rel)
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, rel: str, token: str) -> bool:
        with self.errors(rel), self._locked(rel):
            now = self.read_versioned(rel)
            if now is None or now.token != token:
                return False
            os.unlink(self.path(rel))
        return True


class S3Ops(ObjectOps):
    """S3 and S3-compatible stores; conditional requests through boto3 (same credential chain)."""

    def __init__(
        self, uri: str, fs: pafs.FileSystem, bucket: str, prefix: str,
        endpoint_url: str | None, region: str | None,
    ) -> None:  # fmt: skip
        super().__init__(uri, fs, f"{bucket}/{prefix}" if prefix else bucket)
        self.bucket, self.prefix = bucket, prefix
        self.endpoint_url, self.region = endpoint_url, region
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region or "us-east-1",
                config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3}),
            )
        return self._client

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def check(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(err.response.get("Error", {}).get("Code"))
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"{self.uri}: the bucket {self.bucket!r} does not exist"
                ) from None
            raise StorageError(f"{self.uri}: {_reason(err)} (HTTP {status})") from None
        except Exception as err:
            if not _is_storage_error(err):
                raise
            raise StorageError(f"{self.uri}: {_reason(err)}") from None

    def _precondition_failed(self, err: Any) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(err, ClientError):
            return False
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = err.response.get("Error", {}).get("Code")
        return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")

    def create(self, rel: str, data: bytes) -> bool:
        with self.errors(rel):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data,
                                       IfNoneMatch="*")  # fmt: skip
            except Exception as err:
                if self._precondition_failed(err):
                    return False
                raise
        return True

    def read_versioned(self, rel: str) -> Versioned | None:
        from botocore.exceptions import ClientError

        with self.errors(rel):
            try:
                got = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            data = got["Body"].read()
        from email.utils import parsedate_to_datetime

        server_now = got["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = parsedate_to_datetime(server_now).timestamp() if server_now else time.time()
        return Versioned(data, got["ETag"], now - got["LastModified"].timestamp())

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        with self.errors(rel):
            try:
                put = self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data,
                                             IfMatch=token)  # fmt: skip
            except Exception as err:
                if self._precondition_failed(err) or _is_missing(err):
                    return None
                raise
        return put["ETag"]

    def delete_if(self, rel: str, token: str) -> bool:
        # Read-compare-delete: S3-compatible stores do not all honour If-Match on DELETE. A
        # holder deletes only its own lease, so the window only matters after a takeover race.
        now = self.read_versioned(rel)
        if now is None or now.token != token:
            return False
        with self.errors(rel):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(rel))
        return True


def _is_missing(err: Any) -> bool:
    response = getattr(err, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("NoSuchKey", "404")
