"""Why a storage call failed, told from the SDK's structured errors where it has them (boto3's
classes and S3 error codes), from pyarrow.fs's text only where that is all there is."""

from __future__ import annotations

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
)

from workers.storage.errors import reason as _reason


def client_error(code: str, status: int, message: str = "") -> ClientError:
    meta = {"HTTPStatusCode": status}
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": meta}, "Op"
    )


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (client_error("AccessDenied", 403), "access denied"),
        (client_error("InvalidAccessKeyId", 403), "access denied"),
        (client_error("SomethingNew", 403), "access denied"),  # the status says it
        (client_error("NoSuchBucket", 404), "the bucket does not exist"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "cannot reach"),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"), "cannot reach"),
        (NoCredentialsError(), "no credentials"),
        (ConnectionRefusedError(111, "refused"), "cannot reach"),
        (OSError("When reading information for key 'x': AWS Error ACCESS_DENIED"), "access denied"),
        (OSError("curlCode: 7, Couldn't connect to server"), "cannot reach"),
    ],
)
def test_a_failure_is_told_by_what_the_sdk_says(err: BaseException, reason: str) -> None:
    assert _reason(err).startswith(reason), _reason(err)


def test_a_boto3_error_is_told_by_its_code_never_its_message() -> None:
    """A message that mentions another error's name does not decide the reason."""
    err = client_error("InternalError", 500, "not an AccessDenied, not NoSuchBucket, 403")
    assert _reason(err) == "InternalError"
