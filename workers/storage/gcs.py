"""Google Cloud Storage (``gs://``) through ``pyarrow.fs`` alone: the generic ``Store``, whose
conditional writes check, then write (safe while one driver holds the output's lease; see the
README). The emulator of ``STORAGE_EMULATOR_HOST`` is used when set."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from workers.storage.base import StorageOptions, Store


def gcs_filesystem(opts: StorageOptions) -> pafs.GcsFileSystem:
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


class GcsStore(Store):
    scheme: ClassVar[str] = "gs"

    def __init__(self, bucket: str, prefix: str, options: StorageOptions) -> None:
        root = f"{bucket}/{prefix}" if prefix else bucket
        super().__init__(f"gs://{root}", root, gcs_filesystem(options), options)
