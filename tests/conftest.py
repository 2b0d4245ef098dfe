"""Session fixtures: a real vLLM CPU server (tiny model), a real S3 server, a local Ray cluster.

Each is started once per test session and stopped at the end (by PID / ray.shutdown), as the
vLLM and Ray test suites do. The S3 server (SeaweedFS, ``tests/object_store.py``) puts its
endpoint and credentials in this process's environment before Ray starts, as a cluster's nodes
would have them, so harvest workers find them the same way. Set HARVEST_TEST_TEACHER_URL to
reuse a tiny-model server you already run (served as "tiny"), e.g. while iterating on tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "tests" / "data" / "tiny-llama"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/fake_teacher.py

# Keep Ray on loopback: without this it advertises the machine's external address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def tiny_teacher() -> str:
    """Base URL of a real vLLM OpenAI server serving the tiny Llama as model "tiny"."""
    url = os.environ.get("HARVEST_TEST_TEACHER_URL")
    if url:
        yield url
        return
    from workers.replica.vllm_server import VllmServer

    server = VllmServer(
        model=str(TINY_MODEL),
        served_name="tiny",
        workdir=ROOT / ".cache" / "test-vllm",  # kept between runs: warm compile caches
        # --max-logprobs 128: top-64 and top-128 jobs (tests/integration/test_topk_real.py).
        extra_args=[
            *("--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"),
            *("--max-logprobs", "128"),
        ],
    )
    server.start(timeout_s=300)
    try:
        # The first logprobs request compiles an op (~20 s cold); pay it here, not in a test.
        warm = {"model": "tiny", "prompt": "warm up", "max_tokens": 2, "logprobs": 5}
        httpx.post(f"{server.url}/completions", json=warm, timeout=300).raise_for_status()
        yield server.url
    finally:
        server.stop()


RAY_METRICS_PORT: list[int] = []  # the session cluster's Prometheus port, once it runs


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 with a fresh data folder and bucket."""
    from object_store import set_env, start_s3

    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        set_env(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A local GCS emulator (fake-gcs-server) on 127.0.0.1, found via STORAGE_EMULATOR_HOST."""
    from object_store import start_gcs

    server = start_gcs(tmp_path_factory.mktemp("fake-gcs"))
    os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    try:
        yield server
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        server.stop()


def _prefix(request) -> str:
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def gs_prefix(gcs_server, request) -> str:
    """A fresh ``gs://bucket/prefix`` for one test."""
    return f"gs://{gcs_server.bucket}/{_prefix(request)}"


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh ``s3://bucket/prefix`` for one test."""
    return f"s3://{s3_server.bucket}/{_prefix(request)}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session; harvest's scheduler reuses it. Started after the
    S3 server, so its workers inherit the object store's environment. Its metrics are exported
    on a port of its own (``ray_metrics_url``)."""
    import ray

    from workers.replica.vllm_server import free_port

    for attempt in range(2):  # a node that times out starting on a loaded machine: once more
        RAY_METRICS_PORT[:] = [free_port()]
        try:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                _metrics_export_port=RAY_METRICS_PORT[0],
            )
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_url(ray_cluster) -> str:
    """Where the session cluster's node serves its Prometheus metrics."""
    return f"http://127.0.0.1:{RAY_METRICS_PORT[0]}/metrics"
