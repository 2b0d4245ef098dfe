"""Top-20 against the real vLLM server (started with ``--max-logprobs 128``; K=20 is vLLM's
default cap, and tests/integration/test_topk_real.py covers K=64 and 128).

Chat rows go through the server's own chat template (``/tokenize``) and ``/v1/completions`` with
a token-id prompt, so K=20 needs no K+1 request. Every record must hold exactly 20 alternatives
per token, agree with its sampled logprobs, and carry the prompt ids the server's own
``/tokenize`` gives.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from test_harvest_e2e import write_job

from harvest.cli import main
from harvest.training import reader
from workers.shards.columns import read_metadata

pytestmark = pytest.mark.integration

K, ROWS = 20, 20


def write_rows(folder) -> dict[str, dict]:
    rows = {}
    for i in range(ROWS):
        rows[f"chat-{i}"] = {
            "messages": [
                {"role": "system", "content": "You answer in one line."},
                {"role": "user", "content": f"What comes after {i}?"},
            ]
        }
        rows[f"text-{i}"] = {"prompt": f"Line {i}: the answer is"}
    with open(folder / "prompts.jsonl", "w") as fh:
        for rid, row in rows.items():
            fh.write(json.dumps({"id": rid, **row}) + "\n")
    return rows


def server_ids(url: str, row: dict) -> list[int]:
    """The server's own tokenisation: chat template applied, generation prompt added."""
    if "messages" in row:
        req = {"model": "tiny", "messages": row["messages"], "add_generation_prompt": True}
    else:
        req = {"model": "tiny", "prompt": row["prompt"]}
    resp = httpx.post(url.removesuffix("/v1") + "/tokenize", json=req, timeout=30)
    resp.raise_for_status()
    return resp.json()["tokens"]


def test_top20_chat_and_completions_on_the_real_server(tmp_path, tiny_teacher, ray_cluster):
    rows = write_rows(tmp_path)
    job = write_job(
        tmp_path, tiny_teacher,
        sampling={"max_tokens": 16, "n": 1, "logprobs": K, "seed": 3, "temperature": 1.0},
    )  # fmt: skip
    assert main(["run", str(job), "--no-progress"]) == 0
    out = tmp_path / "out"
    assert reader.data_files(out, "failed") == []
    data = reader.read_table(out).to_pylist()
    assert sorted(r["prompt_id"] for r in data) == sorted(rows)
    inside = outside = 0
    for rec in data:
        assert rec["prompt_token_ids"] == server_ids(tiny_teacher, rows[rec["prompt_id"]])
        assert rec["prompt_tokens"] == len(rec["prompt_token_ids"])
        assert rec["api"] == ("chat" if "messages" in rows[rec["prompt_id"]] else "completions")
        assert len(rec["token_ids"]) == rec["completion_tokens"] > 0
        for tid, lp, top_ids, top_lps in zip(
            rec["token_ids"], rec["logprobs"], rec["top_token_ids"], rec["top_logprobs"],
            strict=True,
        ):  # fmt: skip
            assert len(top_ids) == len(set(top_ids)) == len(top_lps) == K
            assert top_lps == sorted(top_lps, reverse=True)
            if tid in top_ids:
                inside += 1
                assert math.isclose(top_lps[top_ids.index(tid)], lp, abs_tol=1e-5)
            else:
                outside += 1  # vLLM sent it as a 21st entry; the 20 best were kept
                assert lp <= top_lps[-1] + 1e-5
    assert inside > 0 and outside > 0  # both cases were exercised
    meta = read_metadata(reader.data_files(out)[0])
    assert meta["logprob_mode"] == "raw_logprobs"
