"""Every top-K encoding round-trips real answers (the vLLM server's, at K=64) within the error
its shard records; float32 bit-exact. A compact harvest reads back through every reader."""

from __future__ import annotations

import asyncio
import json

import jobs
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_harvest_e2e import write_job

from harvest.cli import main
from harvest.training import inspection, reader
from harvest.training.batches import iter_batches
from schemas.records import TOPK_ENCODINGS, record_schema
from schemas.wire import PromptRow
from workers.shards.columns import compact, read_metadata
from workers.shards.topk_codec import decode_batch, top_k_kl
from workers.shards.writer import ShardWriter
from workers.storage import open_store
from workers.teacher.client import TeacherClient

pytestmark = pytest.mark.integration

K = 64


@pytest.fixture(scope="module")
def answers(tiny_teacher):
    """Real answers: completion rows at K=64, as the worker's client parses them."""
    spec = jobs.spec(
        jobs.model("tiny", tiny_teacher), sampling={"max_tokens": 24, "logprobs": K, "seed": 9}
    )

    async def go():
        client = TeacherClient(spec, job_id="encodings")
        try:
            rows = [PromptRow(f"p{i}", "t", prompt=f"Encoding test {i}:") for i in range(6)]
            return [compact((await client.complete(r)).samples[0]) for r in rows]
        finally:
            await client.aclose()

    return asyncio.run(go())


def write(tmp_path, samples, encoding: str) -> str:
    writer = ShardWriter(
        open_store(str(tmp_path)), f"{encoding}.parquet", record_schema(K, "float32", encoding),
        {"kind": "data"}, max_rows=4,
    )  # fmt: skip

    async def go():
        for i, s in enumerate(samples):
            writer.append(
                request_id=f"r{i}", prompt_id=f"p{i}", sample_index=0, api="completions",
                prompt="x", response=s.response, completion_tokens=len(s.token_ids),
                prompt_token_ids=[1], token_ids=s.token_ids, logprobs=s.logprobs,
                top_token_ids=s.top_token_ids, top_logprobs=s.top_logprobs, teacher="tiny",
                attempts=1,
            )  # fmt: skip
            if writer.due:
                await writer.flush()
        await writer.close()

    asyncio.run(go())
    return str(tmp_path / f"{encoding}.parquet")


@pytest.mark.parametrize("encoding", TOPK_ENCODINGS)
def test_each_encoding_round_trips_real_answers_within_its_recorded_error(
    tmp_path, answers, encoding
) -> None:
    path = write(tmp_path, answers, encoding)
    assert pq.ParquetFile(path).metadata.num_row_groups == 2  # the error spans row groups
    entry = read_metadata(path)["topk_encoding"]
    assert entry["name"] == encoding
    table = decode_batch(pq.read_table(path))
    worst, kls = 0.0, []
    for rec, s in zip(table.to_pylist(), answers, strict=True):
        ids, lps = np.array(rec["top_token_ids"]), np.array(rec["top_logprobs"], np.float64)
        assert ids.shape == lps.shape == s.top_token_ids.shape == (len(s.token_ids), K)
        if entry.get("lossless"):
            assert (ids == s.top_token_ids).all()
            assert (lps == s.top_logprobs.astype(np.float32)).all()  # bit-exact float32
            continue
        assert (np.diff(lps, axis=1) <= 0).all()  # still best first
        for t in range(len(ids)):  # the same alternatives, each within the recorded error
            order = np.argsort(ids[t])
            want = np.argsort(s.top_token_ids[t])
            assert (ids[t][order] == s.top_token_ids[t][want]).all()
            err = np.abs(lps[t][order] - s.top_logprobs[t][want])
            worst = max(worst, float(err.max()))
            kls.append(float(top_k_kl(s.top_logprobs[t][want][None], lps[t][order][None])[0]))
    if not entry.get("lossless"):
        assert 0 < worst <= entry["max_abs_logprob_error"] + 1e-6 <= 1 / 32 + 1e-6
        assert entry["positions"] == len(kls) == sum(len(s.token_ids) for s in answers)
        assert np.isclose(np.mean(kls), entry["mean_top_k_kl"], rtol=1e-3, atol=1e-12)
        assert entry["mean_top_k_kl"] < 1e-3


def test_a_compact_harvest_reads_back_through_every_reader(tmp_path, tiny_teacher, ray_cluster):
    with open(tmp_path / "prompts.jsonl", "w") as fh:
        for i in range(4):
            row = (
                {"prompt": f"Row {i}:"}
                if i % 2
                else {"messages": [{"role": "user", "content": f"Hi {i}"}]}
            )
            fh.write(json.dumps({"id": f"p{i}", **row}) + "\n")
    job = write_job(
        tmp_path, tiny_teacher, output={"dir": "out", "topk_encoding": "compact"},
        sampling={"max_tokens": 6, "n": 1, "logprobs": K, "seed": 2},
    )  # fmt: skip
    assert main(["run", str(job), "--no-progress"]) == 0
    out = tmp_path / "out"
    files = reader.data_files(out)
    assert "top_k_compact" in pq.read_schema(files[0]).names  # stored compact
    table = reader.read_table(out)
    assert "top_k_compact" not in table.schema.names
    for rec in table.to_pylist():
        assert all(len(row) == K for row in rec["top_token_ids"] + rec["top_logprobs"])
        for tid, lp, ids, lps in zip(rec["token_ids"], rec["logprobs"], rec["top_token_ids"],
                                     rec["top_logprobs"], strict=True):  # fmt: skip
            if tid in ids:  # the sampled logprob (exact) matches its entry within the error
                assert abs(lps[ids.index(tid)] - lp) <= 1 / 32 + 1e-6
    batch = next(iter_batches(out, batch_size=4, max_len=32, pad_to="max_len"))
    assert batch["top_ids"].shape == (4, 32, K) and batch["top_logprobs"].dtype == np.float32
    torch = pytest.importorskip("torch")  # the train extra; installed in CI
    from harvest import HarvestIterableDataset

    first = next(iter(HarvestIterableDataset(out, batch_size=4, max_len=32, pad_to="max_len")))
    assert torch.equal(
        torch.as_tensor(first["top_logprobs"]), torch.as_tensor(batch["top_logprobs"])
    )
    text = inspection.report(out, samples=0)
    assert "top-K encoding: compact" in text and "mean top-K KL" in text
    assert f"teacher top-{K} mass" in text
