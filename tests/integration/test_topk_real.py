"""Any K the server serves, against the real vLLM server started with ``--max-logprobs 128``.

Generate mode at K=128 (chat and completion rows) and score mode at K=64 must hold exactly K
alternatives per token, best first, each sampled logprob equal to its entry when present; a job
above the server's cap must stop at the preflight with one line and send no row (counted from
the server's own request counters).
"""

from __future__ import annotations

import json
import math
import re

import httpx
import pytest
import yaml
from fault_teacher_server import FaultPlan, FaultTeacherServer
from test_fault_matrix import write
from test_harvest_e2e import write_job

from harvest.cli import main
from harvest.training import reader

pytestmark = pytest.mark.integration

SERVER_CAP = 128  # tests/conftest.py starts the server with --max-logprobs 128


def write_rows(folder, rows: dict[str, dict]) -> None:
    with open(folder / "prompts.jsonl", "w") as fh:
        for rid, row in rows.items():
            fh.write(json.dumps({"id": rid, **row}) + "\n")


def check_top_k(data: list[dict], k: int) -> tuple[int, int]:
    """Every token: exactly k distinct alternatives, best first, its own logprob equal to its
    entry when present. Returns (tokens inside the top-k, outside)."""
    inside = outside = 0
    for rec in data:
        assert len(rec["token_ids"]) > 0
        for tid, lp, top_ids, top_lps in zip(
            rec["token_ids"], rec["logprobs"], rec["top_token_ids"], rec["top_logprobs"],
            strict=True,
        ):  # fmt: skip
            assert len(top_ids) == len(set(top_ids)) == len(top_lps) == k
            assert top_lps == sorted(top_lps, reverse=True)
            if tid in top_ids:
                inside += 1
                assert math.isclose(top_lps[top_ids.index(tid)], lp, abs_tol=1e-5)
            else:
                outside += 1
                assert lp <= top_lps[-1] + 1e-5
    return inside, outside


def test_top128_chat_and_completions(tmp_path, tiny_teacher, ray_cluster) -> None:
    rows = {f"chat-{i}": {"messages": [{"role": "user", "content": f"Count to {i}."}]}
            for i in range(3)}  # fmt: skip
    rows |= {f"text-{i}": {"prompt": f"Line {i}: the answer is"} for i in range(3)}
    write_rows(tmp_path, rows)
    job = write_job(
        tmp_path, tiny_teacher,
        sampling={"max_tokens": 6, "n": 1, "logprobs": 128, "seed": 5, "temperature": 1.0},
    )  # fmt: skip
    assert main(["run", str(job), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert reader.data_files(out, "failed") == []
    data = reader.read_table(out).to_pylist()
    assert sorted(r["prompt_id"] for r in data) == sorted(rows)
    assert {r["api"] for r in data} == {"chat", "completions"}
    inside, _ = check_top_k(data, 128)
    assert inside > 0


def test_score_mode_top64(tmp_path, tiny_teacher, ray_cluster) -> None:
    rows = {
        "text": {"prompt": "Line 1: the answer is", "response": " forty-two, as ever."},
        "chat": {"messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello there."}]},
    }  # fmt: skip
    write_rows(tmp_path, rows)
    job = write_job(tmp_path, tiny_teacher, mode="score", sampling={"n": 1, "logprobs": 64})
    assert main(["run", str(job), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert reader.data_files(out, "failed") == []
    data = reader.read_table(out).to_pylist()
    assert sorted(r["prompt_id"] for r in data) == sorted(rows)
    inside, _ = check_top_k(data, 64)
    assert inside > 0


def request_counts(url: str) -> dict[str, float]:
    """The server's own count of answered generation requests, by handler and status class."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for m in re.finditer(
        r'^http_requests_total\{handler="(/v1/(?:chat/)?completions)",method="POST",'
        r'status="(\dxx)"\} (\S+)$', text, re.M,
    ):  # fmt: skip
        counts[f"{m[1]} {m[2]}"] = float(m[3])
    return counts


def test_a_k_above_the_server_cap_stops_at_preflight(tmp_path, tiny_teacher, ray_cluster, capsys):
    write_rows(tmp_path, {f"text-{i}": {"prompt": f"Row {i}"} for i in range(5)})
    job = write_job(tmp_path, tiny_teacher, sampling={"max_tokens": 4, "logprobs": SERVER_CAP + 1})
    before = request_counts(tiny_teacher)
    assert main(["run", str(job), "--no-progress"]) != 0
    after = request_counts(tiny_teacher)
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "--max-logprobs" in x)
    assert f"at most {SERVER_CAP} logprobs" in line and f"logprobs={SERVER_CAP + 1}" in line
    assert f"--max-logprobs {SERVER_CAP + 1}" in line and "teacher.replicas.vllm_args" in line
    # The probe was refused (the server's counter grew). Other clients of a shared server may
    # add answered requests meanwhile, so "no row answered" is counted on a server of our own
    # below (test_no_row_is_sent_above_the_cap).
    refused = "/v1/completions 4xx"
    assert after.get(refused, 0) >= before.get(refused, 0) + 1
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_no_row_is_sent_above_the_cap(tmp_path, ray_cluster, capsys) -> None:
    """The same refusal from a server that logs every request: one probe, then nothing."""
    prompts = [f"capped {i}" for i in range(12)]  # chat and completion rows
    with FaultTeacherServer(model="fault", plan=FaultPlan(max_logprobs=20)) as server:
        job = write(tmp_path, server.url, prompts)
        spec = yaml.safe_load(job.read_text())
        spec["sampling"]["logprobs"] = 21
        job.write_text(yaml.safe_dump(spec))
        assert main(["run", str(job), "--no-progress"]) != 0
        log = server.log
    line = next(x for x in capsys.readouterr().err.splitlines() if "--max-logprobs" in x)
    assert "at most 20 logprobs" in line and "--max-logprobs 21" in line
    generation = [r for r in log if r.path in ("/v1/completions", "/v1/chat/completions")]
    assert [r.outcome for r in generation] == ["400"]  # the probe, refused; no row after it
    assert all(r.key is None or r.key.startswith(("Hello", "Teacher-harvest")) or
               "capped" not in r.key for r in log)  # fmt: skip
    assert not list((tmp_path / "out").rglob("*.parquet"))
