"""End to end against the real vLLM CPU server and a real local Ray cluster.

`harvest run` harvests 60 prompts (completions and chat) with n=2 and top-5 logprobs; the output
is checked record by record against the teacher's own tokenizer, and read back with pyarrow,
polars and datasets as training code would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jobs
import pyarrow.parquet as pq
import pytest

from harvest.cli import main
from harvest.training import reader
from schemas.records import SCHEMA_VERSION
from workers.shards.columns import read_metadata

pytestmark = pytest.mark.integration

K, N = 5, 2
TINY_MODEL = Path(__file__).resolve().parents[1] / "data" / "tiny-llama"


def write_inputs(folder: Path, count: int = 60) -> list[str]:
    """Half plain prompts (derived ids), half chat rows with explicit ids."""
    ids = []
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(count):
            if i % 2:
                row = {
                    "id": f"chat-{i}",
                    "messages": [{"role": "user", "content": f"Count to {i}."}],
                }
                ids.append(row["id"])
            else:
                row = {"prompt": f"The number {i} is"}
                ids.append(f"prompts.jsonl:{i + 1}")
            fh.write(json.dumps(row) + "\n")
    return ids


def write_job(folder: Path, url: str, **sections) -> Path:
    """A job for the tiny teacher at ``url``; ``sections`` replace the defaults here."""
    defaults = {
        "teacher": jobs.model("tiny", url),
        "input": "prompts.jsonl",
        "sampling": {"max_tokens": 24, "n": N, "logprobs": K, "seed": 11, "temperature": 1.0},
        "output": {"dir": "out", "rows_per_shard": 30},
        "concurrency": {"workers": 2, "in_flight_per_endpoint": 16},
    }
    return jobs.write_job(folder, jobs.job(**{**defaults, **sections}))


@pytest.fixture(scope="module")
def harvested(tmp_path_factory, tiny_teacher, ray_cluster):
    folder = tmp_path_factory.mktemp("e2e")
    ids = write_inputs(folder)
    job = write_job(folder, tiny_teacher)
    code = main(["run", str(job), "--no-progress"])
    return folder / "out", ids, code


def test_run_succeeds_with_one_row_per_prompt_and_sample(harvested):
    out, ids, code = harvested
    assert code == 0
    table = reader.read_table(out)
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))
    assert sorted(keys) == sorted((i, s) for i in ids for s in range(N))
    assert len(table["request_id"].unique()) == len(ids) * N
    assert set(table["api"].to_pylist()) == {"completions", "chat"}
    assert reader.data_files(out, "failed") == []
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["output"]["data_rows"] == len(ids) * N and summary["output"]["failure_rows"] == 0


def test_token_ids_decode_to_the_response_text(harvested):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    rows = reader.read_table(harvested[0]).to_pylist()
    for row in rows:
        assert row["completion_tokens"] == len(row["token_ids"]) > 0
        assert tok.decode(row["token_ids"], skip_special_tokens=True) == row["response"]


def test_logprobs_agree_with_top_k(harvested):
    rows = reader.read_table(harvested[0]).to_pylist()
    seen_in_top = outside_top = 0
    for row in rows:
        assert len(row["logprobs"]) == len(row["top_token_ids"]) == len(row["top_logprobs"])
        for tid, lp, top_ids, top_lps in zip(
            row["token_ids"],
            row["logprobs"],
            row["top_token_ids"],
            row["top_logprobs"],
            strict=True,
        ):
            assert lp <= 0 and all(v <= 0 for v in top_lps)
            assert len(top_ids) == len(top_lps) == K
            assert top_lps == sorted(top_lps, reverse=True)
            if tid in top_ids:
                seen_in_top += 1
                assert math.isclose(top_lps[top_ids.index(tid)], lp, rel_tol=0, abs_tol=1e-5)
            else:
                outside_top += 1
                assert lp <= top_lps[-1] + 1e-5  # not in the top K: no likelier than the K-th
    assert seen_in_top > 0 and outside_top > 0  # the sample exercised both cases


def test_shards_carry_provenance_metadata(harvested):
    out = harvested[0]
    for path in reader.data_files(out):
        meta = read_metadata(path)
        assert meta["schema_version"] == SCHEMA_VERSION
        assert meta["teacher"]["model"] == "tiny"
        assert meta["authorization"]["license"] == "apache-2.0"
        assert meta["spec"]["sampling"]["logprobs"] == K
        assert meta["kind"] == "data"
        # Found by the preflight probe: the shared server runs vLLM's default mode.
        assert meta["logprob_mode"] == "raw_logprobs", meta["logprob_mode_how"]
        assert "identical at temperature 1 and 0.5" in meta["logprob_mode_how"]
    assert not list(out.rglob(".tmp-*"))


def test_output_reads_in_polars_and_datasets(harvested):
    import datasets
    import polars as pl

    out, ids, _ = harvested
    files = reader.data_files(out)
    frame = pl.read_parquet(files)
    assert frame.height == len(ids) * N
    assert frame.schema["top_logprobs"] == pl.List(pl.Array(pl.Float32, K))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == len(ids) * N
    first = ds[0]
    assert len(first["top_token_ids"][0]) == K and isinstance(first["token_ids"][0], int)
    assert pq.read_table(files[0]).num_rows > 0


def test_rerun_is_a_noop_with_identical_rows(harvested):
    out = harvested[0]
    before = sorted(reader.read_table(out)["request_id"].to_pylist())
    assert main(["run", str(out.parent / "job.yaml"), "--no-progress"]) == 0
    assert sorted(reader.read_table(out)["request_id"].to_pylist()) == before


def test_cli_process_starts_its_own_ray_and_records_bad_rows(tmp_path, tiny_teacher):
    """The real console script, in a fresh process with no cluster to join."""
    (tmp_path / "prompts.jsonl").write_bytes(
        b'{"prompt": "one"}\n{"prompt": 5}\nnot json\n'
        b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    job = write_job(tmp_path, tiny_teacher, output={"dir": "out", "rows_per_shard": 4})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "harvest.cli", "run", str(job), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "completed with failures" in proc.stdout
    assert "Traceback" not in proc.stderr
    failed = reader.read_table(tmp_path / "out", "failed").to_pylist()
    reasons = {r["prompt_id"]: r["message"] for r in failed}
    assert set(reasons) == {"prompts.jsonl:2", "prompts.jsonl:3"}
    assert "must be a string" in reasons["prompts.jsonl:2"]
    assert "malformed JSON" in reasons["prompts.jsonl:3"]
    assert len(failed) == 2 * N
    assert reader.read_table(tmp_path / "out").num_rows == 2 * N
