"""Harvest on a real two-node Ray cluster on this machine, on 127.0.0.1 only.

One cluster for the module: a head from ``ray start --head --block`` (custom resource
``node_a``, dashboard and job API on loopback) and a second node joining it with the custom
resource ``node_b``. The first test runs ``harvest run --ray-address`` and checks that the
harvest actors ran on both nodes; the second submits ``harvest run`` with ``ray job submit
--working-dir`` and checks the job and its output. Both write to ``s3://`` on the session's S3
server (whose endpoint and credentials are in the nodes' environment, as on a real cluster):
every node's shards are read back through the reader, and no shard lands on local disk.

Ray 2.60 on one host, as measured here:
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is what keeps Ray on 127.0.0.1 (without it Ray swaps
  127.0.0.1, in ``--node-ip-address`` and in ``--address``, for eth0's address). But the same
  variable also makes ``ray start --address`` refuse to add a node ("Multi-node Ray clusters are
  not supported on Windows and OSX"). So the second node is started the way ``ray start
  --address ... --block`` starts one (``ray._private.node.Node(head=False)``, as Ray's own
  ``ray.cluster_utils.Cluster.add_node`` does), in a child process of its own. It shares the
  head's temp dir and session (Ray's default for a worker node).
- ``ray stop`` takes no address or temp dir: it stops every Ray process on the machine (the
  session cluster of other tests too). Each node here is a process group of its own, stopped
  by SIGTERM to its leader; any straggler (matched by group or temp dir) is killed by PID.
- The head enables token authentication (``~/.ray/auth_token`` exists), and clients given an
  explicit address do not pick the token up. The cluster and every client here get their own
  ``RAY_AUTH_MODE=token`` and random ``RAY_AUTH_TOKEN``, so ``~/.ray`` is neither read nor
  written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from test_harvest_e2e import write_inputs, write_job

from harvest.training import reader
from workers.shards.columns import read_metadata
from workers.storage import open_store

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent  # the venv's bin: ray, harvest
PROMPTS, N = 40, 2
ROWS_PER_SHARD = 8  # 4 prompts per unit: 10 units
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300

# What `ray start --address ... --block` runs, minus its refusal under
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; SIGTERM stops the node's processes (Node's shutdown hook).
WORKER_NODE = """
import json, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams

node = Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=True,
            spawn_reaper=True)
print("NODE READY", node.node_id, flush=True)
while True:
    time.sleep(3600)
"""


@dataclass
class Cluster:
    gcs_address: str
    dashboard: str
    env: dict[str, str]
    nodes: dict[str, str]  # node id -> its custom resource (node_a on the head, node_b)
    temp_dir: str


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


def ray_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def wait_for_line(proc: subprocess.Popen, log: Path, marker: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if marker in line:
                return line
        if proc.poll() is not None:
            pytest.fail(f"{log.name}: exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"{log.name}: no {marker!r} within {timeout:.0f}s:\n{text[-3000:]}")


def alive_nodes(env: dict[str, str], dashboard: str) -> list[dict]:
    proc = ray_cli(env, "list", "nodes", "--address", dashboard, "--format", "json")
    if proc.returncode != 0:
        return []
    return [n for n in json.loads(proc.stdout) if n["state"] == "ALIVE"]


def cluster_processes(leaders: list[int], temp_dir: str) -> list[psutil.Process]:
    """Processes of this cluster only: in a node's process group, or naming its temp dir."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            args = proc.info["cmdline"] or []
            names_dir = any(a.endswith(temp_dir) or f"{temp_dir}/" in a for a in args)
            if os.getpgid(proc.pid) in leaders or names_dir:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


def stop_cluster(nodes: list[subprocess.Popen], temp_dir: str) -> None:
    for proc in reversed(nodes):  # the second node, then the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    left = cluster_processes([p.pid for p in nodes], temp_dir)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    assert not cluster_processes([p.pid for p in nodes], temp_dir), "Ray processes left over"


@pytest.fixture(scope="module")
def cluster(s3_server) -> Cluster:
    temp_dir = tempfile.mkdtemp(prefix="th-ray-", dir="/tmp")  # sockets: paths < 108 bytes
    gcs, dash, client, *ports = free_ports(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind and advertise 127.0.0.1, nothing else
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `harvest` for submitted jobs
    )
    object_store = str(200 * 1024 * 1024)
    head_cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--num-cpus", "2", "--resources", json.dumps({"node_a": 1}),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
        "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
        "--dashboard-agent-listen-port", str(ports[2]),
        "--dashboard-agent-grpc-port", str(ports[3]),
        "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--object-store-memory", object_store, "--temp-dir", temp_dir,
    ]  # fmt: skip
    worker_params = {
        "gcs_address": f"127.0.0.1:{gcs}",
        "node_ip_address": "127.0.0.1",
        "node_name": "127.0.0.1",
        "num_cpus": 2,
        "resources": {"node_b": 1},
        "node_manager_port": ports[6],
        "object_manager_port": ports[7],
        "dashboard_agent_listen_port": ports[8],
        "metrics_agent_port": ports[9],
        "runtime_env_agent_port": ports[10],
        "metrics_export_port": ports[11],
        "min_worker_port": 0,
        "max_worker_port": 0,
        "object_store_memory": int(object_store),
        "include_log_monitor": False,  # one per host: the head's
    }
    worker_cmd = [sys.executable, "-c", WORKER_NODE, json.dumps(worker_params)]
    logs = Path(temp_dir)
    nodes: list[subprocess.Popen] = []
    try:
        for name, cmd, marker in (
            ("head.log", head_cmd, "block forever"),
            ("node_b.log", worker_cmd, "NODE READY"),
        ):
            with open(logs / name, "w") as log:
                nodes.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            wait_for_line(nodes[-1], logs / name, marker, START_TIMEOUT_S)
        dashboard = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while len(alive := alive_nodes(env, dashboard)) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(alive) == 2, f"expected 2 alive nodes, got {alive}"
        assert {n["node_ip"] for n in alive} == {"127.0.0.1"}
        names = {
            n["node_id"]: next(r for r in ("node_a", "node_b") if r in n["resources_total"])
            for n in alive
        }
        assert sorted(names.values()) == ["node_a", "node_b"]
        yield Cluster(f"127.0.0.1:{gcs}", dashboard, env, names, temp_dir)
    finally:
        stop_cluster(nodes, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def harvest_job(folder: Path, url: str, out: str) -> Path:
    return write_job(
        folder,
        url,
        sampling={"max_tokens": 16, "n": N, "logprobs": 5, "seed": 3, "temperature": 1.0},
        output={"dir": str(out), "rows_per_shard": ROWS_PER_SHARD},
        # 0.5 CPU each: both fit on one 2-CPU node, so only SPREAD puts them on two nodes
        # (Ray's default policy packs them onto the driver's node).
        concurrency={"workers": 2, "in_flight_per_endpoint": 8, "worker_cpus": 0.5},
    )


def check_output(out: str, ids: list[str], local_dirs: list[Path]) -> dict:
    """The whole output, read back from the object store; no shard on any local disk."""
    assert out.startswith("s3://")
    files = reader.data_files(out)
    assert files and all(f.startswith(f"{out}/data/part-") for f in files)
    for folder in local_dirs:
        assert not list(folder.rglob("*.parquet")), f"a shard on local disk under {folder}"
    table = reader.read_table(out)
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))
    assert sorted(keys) == sorted((i, s) for i in ids for s in range(N))  # complete, no duplicate
    assert len(set(table["request_id"].to_pylist())) == table.num_rows == len(ids) * N
    assert reader.data_files(out, "failed") == []
    summary = json.loads(open_store(out).read_bytes("_summary.json"))
    assert summary["output"]["data_rows"] == len(ids) * N and summary["output"]["failure_rows"] == 0
    assert summary["this_run"]["prompts"] == len(ids)
    return summary


def test_harvest_actors_run_on_both_nodes(cluster, tiny_teacher, tmp_path, s3_prefix):
    ids = write_inputs(tmp_path, PROMPTS)
    out = s3_prefix
    job = harvest_job(tmp_path, tiny_teacher, out)
    proc = subprocess.run(
        [str(BIN / "harvest"), "run", str(job), "--ray-address", cluster.gcs_address,
         "--no-progress"],
        env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = check_output(out, ids, [tmp_path, Path(cluster.temp_dir)])
    by_node = summary["this_run"]["units_by_node"]
    units = {read_metadata(f)["unit_id"] for f in reader.data_files(out)}
    assert len(units) == sum(by_node.values())  # every node's shards read back
    assert {cluster.nodes[node] for node in by_node} == {"node_a", "node_b"}, by_node
    assert all(units > 0 for units in by_node.values())
    assert sum(by_node.values()) == PROMPTS // (ROWS_PER_SHARD // N)


def test_ray_job_submit_runs_harvest_on_the_cluster(cluster, tiny_teacher, tmp_path, s3_prefix):
    workdir = tmp_path / "job"
    workdir.mkdir()
    ids = write_inputs(workdir, PROMPTS)
    out = s3_prefix
    harvest_job(workdir, tiny_teacher, out)
    submission = f"harvest-test-{uuid.uuid4().hex[:8]}"
    job_api = ("--address", cluster.dashboard)
    try:
        proc = ray_cli(
            cluster.env,
            "job", "submit", *job_api, "--submission-id", submission,
            "--working-dir", str(workdir),
            "--", "harvest", "run", "job.yaml", "--no-progress",
            timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        ray_cli(cluster.env, "job", "stop", *job_api, submission)
        raise
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = ray_cli(cluster.env, "job", "status", *job_api, submission)
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr
    logs = ray_cli(cluster.env, "job", "logs", *job_api, submission).stdout
    assert f"data rows: {PROMPTS * N}" in logs and "Traceback" not in logs
    summary = check_output(out, ids, [tmp_path, Path(cluster.temp_dir)])
    assert not (workdir / "out").exists()
    # The driver joined this cluster (Ray sets RAY_ADDRESS for it), not a private one.
    by_node = summary["this_run"]["units_by_node"]
    assert by_node and set(by_node) <= set(cluster.nodes)
