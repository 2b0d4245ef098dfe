"""Storage failures as one exception, ``StorageError``: one line naming the location and what
went wrong, never a credential (messages are built here from error codes, not copied from the
SDKs). Each store maps its SDK's errors through ``mapped`` once, at its boundary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class StorageError(OSError):
    """A store cannot be used; the message names the location, never a secret."""


ACCESS = "access denied: check the credentials in the environment"
NO_BUCKET = "the bucket does not exist"
UNREACHABLE = "cannot reach the storage endpoint"
NO_CREDENTIALS = "no credentials in the environment or the standard credential chain"
_ACCESS_CODES = frozenset(
    ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken",
     "ExpiredToken", "Forbidden", "403")
)  # fmt: skip


def reason(err: BaseException) -> str:
    """A short, secret-free description of a storage failure: from the SDK's structured error
    (boto3's class and S3 error code) where there is one, else from pyarrow.fs's text."""
    found = _boto_reason(err)
    if found is None and isinstance(err, ConnectionError | TimeoutError):
        found = UNREACHABLE
    if found is None and isinstance(err, OSError):
        found = _pyarrow_reason(str(err))
    return found or type(err).__name__


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
            return ACCESS
        if code == "NoSuchBucket":
            return NO_BUCKET
        return code or type(err).__name__
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return NO_CREDENTIALS
    if isinstance(err, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return UNREACHABLE
    if isinstance(err, bx.ConnectionClosedError):
        return UNREACHABLE
    return None


def _pyarrow_reason(text: str) -> str | None:
    """pyarrow.fs raises plain OSErrors (S3 and GCS alike) whose only detail is their message,
    in which the C++ SDK writes its error name or curl code: matching that text is all there
    is, so it is done here alone, for those errors alone."""
    table = (
        (("ACCESS_DENIED", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId",
          "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "403", "Forbidden",
          "InvalidToken", "ExpiredToken"), ACCESS),
        (("NoSuchBucket", "NO_SUCH_BUCKET", "bucket does not exist"), NO_BUCKET),
        (("NETWORK_CONNECTION", "Could not connect", "Connection refused", "curlCode",
          "Couldn't connect", "timed out", "Timeout"), UNREACHABLE),
        (("Unable to locate credentials",), NO_CREDENTIALS),
    )  # fmt: skip
    for needles, found in table:
        if any(n in text for n in needles):
            return found
    return None


def is_storage_error(err: BaseException) -> bool:
    """An error a store's SDK or filesystem raised (mapped), not a bug in the caller (raised)."""
    if isinstance(err, OSError):
        return True
    module = type(err).__module__ or ""
    return module.startswith(("botocore", "boto3", "pyarrow", "urllib3"))


@contextlib.contextmanager
def mapped(where: str) -> Iterator[None]:
    """Storage errors inside become ``StorageError("<where>: <reason>")``; a missing file stays
    ``FileNotFoundError`` (callers decide what absence means)."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except Exception as err:
        if not is_storage_error(err):
            raise
        raise StorageError(f"{where}: {reason(err)}") from None
