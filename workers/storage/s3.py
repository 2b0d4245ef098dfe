"""S3 and S3-compatible stores: data through ``pyarrow.fs``, conditional requests through boto3
(the same credential chain), since ``pyarrow.fs`` cannot send conditional headers:
``create`` is ``If-None-Match: *``, ``replace`` is ``If-Match``, a version is the ETag and an
object's age is the server's ``Date`` minus its ``Last-Modified``."""

from __future__ import annotations

import time
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from workers.storage.base import StorageOptions, Store, Versioned
from workers.storage.errors import StorageError, is_storage_error, reason


def s3_filesystem(opts: StorageOptions) -> pafs.S3FileSystem:
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


class S3Store(Store):
    scheme: ClassVar[str] = "s3"

    def __init__(self, bucket: str, prefix: str, options: StorageOptions) -> None:
        root = f"{bucket}/{prefix}" if prefix else bucket
        super().__init__(f"s3://{root}", root, s3_filesystem(options), options)
        self.bucket, self.prefix = bucket, prefix
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.options.endpoint_url,
                region_name=self.options.region or "us-east-1",
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
            raise StorageError(f"{self.uri}: {reason(err)} (HTTP {status})") from None
        except Exception as err:
            if not is_storage_error(err):
                raise
            raise StorageError(f"{self.uri}: {reason(err)}") from None

    def create(self, rel: str, data: bytes) -> bool:
        with self.errors(rel):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data,
                                       IfNoneMatch="*")  # fmt: skip
            except Exception as err:
                if _precondition_failed(err):
                    return False
                raise
        return True

    def read_versioned(self, rel: str) -> Versioned | None:
        from email.utils import parsedate_to_datetime

        with self.errors(rel):
            try:
                got = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            except Exception as err:
                if _is_missing(err):
                    return None
                raise
            data = got["Body"].read()
        server_now = got["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = parsedate_to_datetime(server_now).timestamp() if server_now else time.time()
        return Versioned(data, got["ETag"], now - got["LastModified"].timestamp())

    def replace(self, rel: str, data: bytes, token: str) -> str | None:
        with self.errors(rel):
            try:
                put = self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data,
                                             IfMatch=token)  # fmt: skip
            except Exception as err:
                if _precondition_failed(err) or _is_missing(err):
                    return None
                raise
        return put["ETag"]


def _error(err: Any) -> tuple[Any, Any]:
    """(HTTP status, S3 error code) of a botocore ClientError; (None, None) for anything else."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None, None
    return (
        response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
        response.get("Error", {}).get("Code"),
    )


def _precondition_failed(err: Any) -> bool:
    status, code = _error(err)
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _is_missing(err: Any) -> bool:
    return _error(err)[1] in ("NoSuchKey", "404")
