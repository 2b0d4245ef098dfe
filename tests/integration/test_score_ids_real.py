"""Score mode on given token ids against the real vLLM server: the ids scored are the ids given.

Two proofs. Ids whose decoded text re-tokenises to other ids are scored as given, and their
logprobs equal a transformers forward of the same weights over those ids. A generate-mode
harvest scored by ids with the same model (``input.format: harvest``) gives every sampled token
the logprob the teacher stored while sampling it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from test_harvest_e2e import write_job

from harvest.cli import main
from harvest.training import reader

pytestmark = pytest.mark.integration

K = 5
TINY_MODEL = Path(__file__).resolve().parents[1] / "data" / "tiny-llama"


def tokenize(url: str, **body) -> list[int]:
    resp = httpx.post(url.removesuffix("/v1") + "/tokenize", json={"model": "tiny", **body})
    resp.raise_for_status()
    return resp.json()["tokens"]


@pytest.fixture(scope="module")
def forward():
    """log_softmax of the tiny Llama (transformers, float32) over a sequence of ids."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
    model.eval()

    def run(ids: list[int]):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    return run


def split_ids(url: str, word: str) -> list[int]:
    """``word`` spelt one character per token: ids the tokenizer itself never produces."""
    return [tokenize(url, prompt=c, add_special_tokens=False)[0] for c in word]


@pytest.fixture(scope="module")
def by_ids(tmp_path_factory, tiny_teacher, ray_cluster) -> tuple[Path, dict[str, dict]]:
    folder = tmp_path_factory.mktemp("score-ids")
    prompt = tokenize(tiny_teacher, prompt="Say it:")
    masked = split_ids(tiny_teacher, "the") + tokenize(
        tiny_teacher, prompt="answer", add_special_tokens=False
    )
    rows = {
        "split": {"prompt_token_ids": prompt, "token_ids": split_ids(tiny_teacher, "there")},
        "masked": {
            "prompt_token_ids": prompt,
            "token_ids": masked,
            "loss_mask": [False] + [True] * (len(masked) - 1),
            "logprobs": [-1.0 - j for j in range(len(masked))],
            "sample_index": 3,
        },
        "bad-ids": {"prompt_token_ids": prompt, "token_ids": ["x"]},
    }
    with open(folder / "prompts.jsonl", "w") as fh:
        for rid, row in rows.items():
            fh.write(json.dumps({"id": rid, **row}) + "\n")
    job = write_job(folder, tiny_teacher, mode="score", sampling={"logprobs": K})
    assert main(["run", str(job), "--no-progress"]) == 3  # done, the bad row failed
    return folder / "out", rows


def test_ids_that_retokenise_differently_are_scored_as_given(by_ids, tiny_teacher, forward):
    out, rows = by_ids
    recs = {r["prompt_id"]: r for r in reader.read_table(out).to_pylist()}
    assert sorted(recs) == ["masked", "split"]
    split = recs["split"]
    text = "there"
    assert (
        tokenize(tiny_teacher, prompt=text, add_special_tokens=False) != rows["split"]["token_ids"]
    )  # the case is real: the text comes back as other ids
    for pid, rec in recs.items():
        row = rows[pid]
        assert rec["prompt_token_ids"] == row["prompt_token_ids"]
        assert rec["token_ids"] == row["token_ids"]
        seq = row["prompt_token_ids"] + row["token_ids"]
        lsm = forward(seq)
        p = len(row["prompt_token_ids"])
        for j, tid in enumerate(row["token_ids"]):
            dist = lsm[p + j - 1]
            assert math.isclose(rec["logprobs"][j], float(dist[tid]), abs_tol=1e-4)
            top = dist.topk(K)
            assert rec["top_token_ids"][j] == top.indices.tolist()
            for a, b in zip(rec["top_logprobs"][j], top.values.tolist(), strict=True):
                assert math.isclose(a, b, abs_tol=1e-4)
    assert split["loss_mask"] is None and split["student_logprobs"] is None
    masked = recs["masked"]
    assert masked["loss_mask"] == rows["masked"]["loss_mask"]
    assert masked["student_logprobs"] == rows["masked"]["logprobs"]
    assert masked["sample_index"] == 3
    failed = reader.read_table(out, "failed").to_pylist()
    assert [(f["prompt_id"], f["error_class"]) for f in failed] == [("bad-ids", "InvalidInput")]


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, tiny_teacher, ray_cluster) -> tuple[Path, Path]:
    """A sampled generate-mode harvest, then the same model scoring it by ids."""
    folder = tmp_path_factory.mktemp("gen-then-score")
    with open(folder / "prompts.jsonl", "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"Item {i} is"}) + "\n")
        fh.write(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    sampling = {"max_tokens": 16, "n": 2, "logprobs": K, "seed": 3, "temperature": 1.0}
    job = write_job(folder, tiny_teacher, sampling=sampling)
    assert main(["run", str(job), "--no-progress"]) == 0
    scored = folder / "scored"
    scored.mkdir()
    job = write_job(
        scored, tiny_teacher, mode="score", sampling={"logprobs": K},
        input={"path": str(folder / "out"), "format": "harvest"},
    )  # fmt: skip
    assert main(["run", str(job), "--no-progress"]) == 0
    return folder / "out", scored / "out"


def test_generate_then_score_by_ids_gives_the_stored_logprobs(round_trip):
    generated, scored = round_trip
    gen = {r["request_id"]: r for r in reader.read_table(generated).to_pylist()}
    got = {r["request_id"]: r for r in reader.read_table(scored).to_pylist()}
    assert sorted(got) == sorted(gen) and len(got) == 13 * 2
    worst = 0.0
    for rid, g in gen.items():
        s = got[rid]
        for key in ("prompt_id", "sample_index", "prompt_token_ids", "token_ids", "response"):
            assert s[key] == g[key], key
        assert s["student_logprobs"] == pytest.approx(g["logprobs"], abs=1e-7)
        assert s["loss_mask"] == g["loss_mask"] is None
        for a, b in zip(s["logprobs"], g["logprobs"], strict=True):
            worst = max(worst, abs(a - b))
    assert worst < 1e-4, f"teacher and stored logprobs differ by up to {worst}"
    assert reader.data_files(scored, "failed") == []


def test_a_harvest_on_object_storage_is_scored_by_ids(
    tmp_path, tiny_teacher, ray_cluster, s3_prefix
):
    """``input.format: harvest`` on s3://: the committed shards are listed by the manifest."""
    with open(tmp_path / "prompts.jsonl", "w") as fh:
        for i in range(4):
            fh.write(json.dumps({"id": f"s{i}", "prompt": f"Stored {i} is"}) + "\n")
    sampling = {"max_tokens": 8, "n": 1, "logprobs": K, "seed": 9, "temperature": 1.0}
    source = f"{s3_prefix}/generated"
    job = write_job(tmp_path, tiny_teacher, sampling=sampling, output={"dir": source})
    assert main(["run", str(job), "--no-progress"]) == 0
    scored = tmp_path / "scored"
    scored.mkdir()
    job = write_job(
        scored, tiny_teacher, mode="score", sampling={"logprobs": K},
        input={"path": source, "format": "harvest"}, output={"dir": f"{s3_prefix}/scored"},
    )  # fmt: skip
    assert main(["run", str(job), "--no-progress"]) == 0
    gen = {r["request_id"]: r for r in reader.read_table(source).to_pylist()}
    got = {r["request_id"]: r for r in reader.read_table(f"{s3_prefix}/scored").to_pylist()}
    assert sorted(got) == sorted(gen) and len(got) == 4
    for rid, g in gen.items():
        assert got[rid]["token_ids"] == g["token_ids"]
        for a, b in zip(got[rid]["logprobs"], g["logprobs"], strict=True):
            assert abs(a - b) < 1e-4
