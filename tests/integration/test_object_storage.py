"""Harvests whose input and output live on a real S3 server (SeaweedFS on 127.0.0.1).

- input read from ``s3://`` (JSONL and Parquet, through a glob);
- a wrong credential, a missing bucket or an unreachable endpoint fail before any teacher
  request, in one line naming the URI, and the secret is nowhere in what the run printed or
  wrote;
- one driver per output: a second driver is refused while the first runs; once the first is
  SIGKILLed, a new driver takes over and completes the job once; a driver that is frozen (as
  if cut off) is taken over once its lease expires, and when it wakes it stops, committing
  nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from object_store import free_ports
from test_harvest_e2e import write_job
from test_resume import (
    PROMPTS,
    SHARD_ROWS,
    all_shard_ids,
    committed_units,
    make_job,
    run_after_lease_expires,
    start,
    wait_for_units,
)

from harvest.cli import main
from harvest.outputs.manifest import COMMITS, load
from harvest.training import reader
from workers.storage import open_store

pytestmark = pytest.mark.integration


def test_input_globbed_from_s3_jsonl_and_parquet(s3_prefix, tiny_teacher, ray_cluster, tmp_path):
    store = open_store(f"{s3_prefix}/in")
    store.write_bytes("a/one.jsonl", b'{"prompt": "Alpha is"}\n{"id": "b1", "prompt": "Beta"}\n')
    store.write_bytes("a/notes.md", b"not an input: the glob leaves it out")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["p0", "p1", "p2"], "prompt": ["x", "y", "z"]}), sink)
    store.write_bytes("b/two.parquet", sink.getvalue().to_pybytes())
    job = write_job(
        tmp_path,
        tiny_teacher,
        input=f"{s3_prefix}/in/*/*.*[lt]",  # one.jsonl and two.parquet
        sampling={"max_tokens": 4, "n": 1, "logprobs": 2, "seed": 1},
        output={"dir": f"{s3_prefix}/out", "rows_per_shard": 2},
    )
    assert main(["run", str(job), "--no-progress"]) == 0
    table = reader.read_table(f"{s3_prefix}/out")
    assert sorted(table["prompt_id"].to_pylist()) == ["a/one.jsonl:1", "b1", "p0", "p1", "p2"]
    assert all(f.startswith(f"{s3_prefix}/out/data/part-") for f in reader.data_files(
        f"{s3_prefix}/out"
    ))  # fmt: skip
    assert not list(tmp_path.rglob("*.parquet"))  # nothing went to local disk


class CountingListener:
    """A TCP listener standing in for the teacher: counts every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


WRONG_SECRET = "wrong-secret-5c1e8a7b9d0f4e2a-never-shown"


@pytest.mark.parametrize("fault", ["wrong credential", "missing bucket", "unreachable endpoint"])
def test_unusable_output_fails_before_any_teacher_request(fault, s3_server, s3_prefix, tmp_path):
    teacher = CountingListener()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    out = {"missing bucket": "s3://no-such-bucket-th/out"}.get(fault, s3_prefix)
    job = write_job(tmp_path, teacher.url, output={"dir": out})
    env = {**os.environ}
    if fault == "wrong credential":
        env["AWS_SECRET_ACCESS_KEY"] = WRONG_SECRET
    if fault == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_ports(1)[0]}"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "harvest.cli", "run", str(job), "--no-progress"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    finally:
        teacher.close()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"harvest: error: {out}"), proc.stderr
    expected = {
        "wrong credential": "access denied",
        "missing bucket": "does not exist",
        "unreachable endpoint": "cannot reach",
    }[fault]
    assert expected in lines[0]
    assert teacher.connections == 0
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for secret in (WRONG_SECRET, s3_server.secret_key):
        assert secret not in proc.stdout + proc.stderr and secret.encode() not in written


def test_input_behind_a_wrong_credential_fails_before_any_teacher_request(
    s3_server, s3_prefix, tmp_path
):
    open_store(s3_prefix).write_bytes("in/p.jsonl", b'{"prompt": "hello"}\n')
    teacher = CountingListener()
    job = write_job(tmp_path, teacher.url, input=f"{s3_prefix}/in/*.jsonl")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "harvest.cli", "run", str(job), "--no-progress"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    finally:
        teacher.close()
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"harvest: error: input: {s3_prefix}/in: access denied: check the credentials in the "
        "environment (HTTP 403)"
    )
    assert teacher.connections == 0 and WRONG_SECRET not in proc.stdout + proc.stderr


def test_one_driver_per_output_and_takeover_after_sigkill(
    s3_server, s3_prefix, tmp_path, tiny_teacher, ray_cluster
):
    out = s3_prefix
    job_a = make_job(tmp_path / "a", tiny_teacher, out)
    job_b = make_job(tmp_path / "b", tiny_teacher, out)  # the same job, from another folder
    first = start(job_a, ray_cluster, lease_ttl_s="30")
    try:
        wait_for_units(first, out, 1)
        # Frozen, so it commits nothing more however fast the rest would go (a fast harvest
        # once finished all 32 units while the second driver was starting); its lease still
        # holds for up to 30 s without renewals.
        first.send_signal(signal.SIGSTOP)
        second = start(job_b, ray_cluster)
        _, stderr = second.communicate(timeout=300)
        assert first.poll() is None, "the first driver must still be alive for this check"
        assert second.returncode == 2
        [line] = stderr.strip().splitlines()
        assert f"{out} is in use by another harvest driver: pid {first.pid} on " in line
    finally:
        first.kill()  # SIGKILL also ends a stopped process
        first.wait()
    done_by_first = committed_units(out)
    assert 0 < done_by_first < PROMPTS * 2 // SHARD_ROWS
    run_after_lease_expires(job_b, ray_cluster, first.pid)

    table = reader.read_table(out)
    keys = Counter(
        zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True)
    )
    assert len(keys) == PROMPTS * 2 and set(keys.values()) == {1}  # complete, each row once
    manifest = load(open_store(out))
    assert len(manifest.units) == PROMPTS * 2 // SHARD_ROWS == committed_units(out)
    assert Counter(all_shard_ids(out)) == Counter(table["request_id"].to_pylist())
    keys_left = s3_server.keys(out.split("/", 3)[3] + "/")
    assert sum(k.endswith(".parquet") for k in keys_left) == len(manifest.shard_paths())
    assert not any(k.endswith("_harvest/lease.json") for k in keys_left)
    summary = json.loads(open_store(out).read_bytes("_summary.json"))
    assert summary["this_run"]["prompts"] == PROMPTS - done_by_first * SHARD_ROWS // 2
    assert len(open_store(out).list(COMMITS)) == len(manifest.units)
    assert not list(Path(tmp_path).rglob("*.parquet"))


def test_gs_output_through_the_same_layer(gs_prefix, tiny_teacher, ray_cluster, tmp_path, capsys):
    """gs:// against fake-gcs-server: harvest, read back, provenance, rerun is a no-op."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Number {i} is"}) + "\n" for i in range(6))
    )
    job = write_job(
        tmp_path,
        tiny_teacher,
        sampling={"max_tokens": 4, "n": 2, "logprobs": 2, "seed": 2},
        output={"dir": gs_prefix, "rows_per_shard": 4},
    )
    assert main(["run", str(job), "--no-progress"]) == 0
    first = reader.read_table(gs_prefix)
    assert first.num_rows == 12 and len(set(first["request_id"].to_pylist())) == 12
    assert all(f.startswith(f"{gs_prefix}/data/part-") for f in reader.data_files(gs_prefix))
    assert main(["provenance", gs_prefix]) == 0
    assert "all shards agree" in capsys.readouterr().out
    assert main(["run", str(job), "--no-progress"]) == 0
    assert sorted(reader.read_table(gs_prefix)["request_id"].to_pylist()) == sorted(
        first["request_id"].to_pylist()
    )
    assert not open_store(gs_prefix).exists("_harvest/lease.json")
    assert not list(tmp_path.rglob("*.parquet"))


def test_a_frozen_driver_is_taken_over_once_its_lease_expires_and_then_stops(
    s3_prefix, tmp_path, tiny_teacher, ray_cluster
):
    """SIGSTOP keeps the first driver's pid alive, so only its lease's age can free the output."""
    out = s3_prefix
    first = start(make_job(tmp_path / "a", tiny_teacher, out), ray_cluster, lease_ttl_s="4")
    job_b = make_job(tmp_path / "b", tiny_teacher, out)
    wait_for_units(first, out, 1)
    first.send_signal(signal.SIGSTOP)
    try:
        run_after_lease_expires(job_b, ray_cluster, first.pid)
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 1, stderr
    assert f"another driver took {out} over" in stderr

    table = reader.read_table(out)
    ids = zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True)
    keys = Counter(ids)
    assert len(keys) == PROMPTS * 2 and set(keys.values()) == {1}
    assert len(load(open_store(out)).units) == PROMPTS * 2 // SHARD_ROWS == committed_units(out)
    assert not open_store(out).exists("_harvest/lease.json")


class RejectingProxy:
    """Forwards to the real teacher, except that it answers HTTP 400 to completions whose
    prompt contains ``marker`` while ``rejecting`` is set (a teacher that was later fixed)."""

    def __init__(self, upstream: str, marker: str) -> None:
        import http.server

        import httpx

        proxy = self
        self.rejecting, self.rejected = True, 0
        root = upstream.removesuffix("/v1")

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self, body: bytes | None) -> None:
                if body and proxy.rejecting and marker in json.loads(body).get("prompt", ""):
                    proxy.rejected += 1
                    self._reply(400, b'{"error": {"message": "rejected by the test proxy"}}')
                    return
                resp = httpx.request(self.command, root + self.path, content=body, timeout=300,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
                self._reply(resp.status_code, resp.content)

            def _reply(self, status: int, content: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_retry_failed_on_s3(s3_prefix, tiny_teacher, ray_cluster, tmp_path, capsys):
    """Rows the teacher rejected join the data on S3 once it accepts them; superseded failure
    shards go."""
    prompts = [f"{'flaky ' if i % 4 == 0 else ''}Story {i}:" for i in range(16)]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    )
    proxy = RejectingProxy(tiny_teacher, "flaky")
    try:
        job = write_job(tmp_path, proxy.url, sampling={"max_tokens": 4, "n": 2, "logprobs": 2,
                        "seed": 4}, output={"dir": s3_prefix, "rows_per_shard": 8})  # fmt: skip
        assert main(["run", str(job), "--no-progress"]) == 3
        assert reader.read_table(s3_prefix, "failed").num_rows == 4 * 2 and proxy.rejected == 4
        failed_before = reader.data_files(s3_prefix, "failed")
        proxy.rejecting = False
        assert main(["retry-failed", s3_prefix, "--no-progress"]) == 0
    finally:
        proxy.close()
    capsys.readouterr()
    data = reader.read_table(s3_prefix)
    assert data.num_rows == len(set(data["request_id"].to_pylist())) == len(prompts) * 2
    assert reader.data_files(s3_prefix, "failed") == []
    assert open_store(s3_prefix).list("failed") == []  # superseded failure shards deleted
    assert all(not open_store(s3_prefix).exists(f.split(s3_prefix + "/")[1]) for f in failed_before)
