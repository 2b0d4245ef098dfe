"""Score mode against the real vLLM server: ids, logprobs and masks proven, not assumed.

A generate-mode harvest at temperature 0 makes greedy responses; a score-mode harvest then scores
(prompt, response text). Where the response re-encodes to the generated ids, teacher forcing
must give each token the logprob the teacher gave it while generating. The ids are checked
against the server's ``/tokenize`` and, as a second opinion, the tokenizer files through
``transformers``; the chat mask against positions built by hand from the template's pieces.
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
from workers.shards.columns import read_metadata

pytestmark = pytest.mark.integration

K, ROWS = 5, 20
TINY_MODEL = Path(__file__).resolve().parents[1] / "data" / "tiny-llama"
SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [
    SYSTEM,
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Then we stop."},
]
# The ChatML template's pieces for TWO_TURNS; True marks what the mask must cover.
PIECES = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
    ("<|im_start|>user\nHi<|im_end|>\n", False),
    ("<|im_start|>assistant\n", False),
    ("Hello there.<|im_end|>\n", True),
    ("<|im_start|>user\nAnd then?<|im_end|>\n", False),
    ("<|im_start|>assistant\n", False),
    ("Then we stop.<|im_end|>\n", True),
]


def write_rows(folder: Path, rows: dict[str, dict]) -> None:
    with open(folder / "prompts.jsonl", "w") as fh:
        for rid, row in rows.items():
            fh.write(json.dumps({"id": rid, **row}) + "\n")


def tokenize(url: str, **body) -> list[int]:
    resp = httpx.post(url.removesuffix("/v1") + "/tokenize", json={"model": "tiny", **body})
    resp.raise_for_status()
    return resp.json()["tokens"]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY_MODEL))


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_teacher, ray_cluster) -> dict[str, dict]:
    """Greedy responses of the teacher to ROWS prompts (generate mode, temperature 0)."""
    folder = tmp_path_factory.mktemp("greedy")
    write_rows(folder, {f"p{i}": {"prompt": f"Line {i}: the answer is"} for i in range(ROWS)})
    sampling = {"max_tokens": 12, "n": 1, "logprobs": K, "seed": 7, "temperature": 0.0}
    job = write_job(folder, tiny_teacher, sampling=sampling)
    assert main(["run", str(job), "--no-progress"]) == 0
    assert reader.data_files(folder / "out", "failed") == []
    return {r["prompt_id"]: r for r in reader.read_table(folder / "out").to_pylist()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_teacher, ray_cluster, generated) -> Path:
    """A score-mode harvest of the greedy responses, a two-turn chat and two bad rows."""
    folder = tmp_path_factory.mktemp("score")
    rows = {pid: {"prompt": f"Line {pid[1:]}: the answer is", "response": r["response"]}
            for pid, r in generated.items()}  # fmt: skip
    rows["two-turns"] = {"messages": TWO_TURNS}
    rows["no-assistant"] = {"messages": TWO_TURNS[:2]}
    rows["no-response"] = {"prompt": "Line 99: the answer is"}
    write_rows(folder, rows)
    job = write_job(
        folder, tiny_teacher, mode="score", sampling={"logprobs": K},
        concurrency={"workers": 1, "in_flight_per_endpoint": 8},
    )  # fmt: skip
    assert main(["run", str(job), "--no-progress"]) == 3  # done, with the two bad rows failed
    return folder / "out"


def records(out: Path) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in reader.read_table(out).to_pylist()}


def test_bad_rows_are_failure_rows_and_shards_say_score(scored):
    failed = {r["prompt_id"]: r for r in reader.read_table(scored, "failed").to_pylist()}
    assert {pid: r["error_class"] for pid, r in failed.items()} == {
        "no-assistant": "InvalidInput", "no-response": "InvalidInput"
    }  # fmt: skip
    assert sorted(records(scored)) == sorted([f"p{i}" for i in range(ROWS)] + ["two-turns"])
    meta = read_metadata(reader.data_files(scored)[0])
    assert meta["mode"] == "score" and meta["spec"]["mode"] == "score"
    # The preflight probed the scoring path; prompt logprobs skip the sampling processors.
    assert meta["logprob_mode"] == "raw_logprobs"


def test_ids_are_the_teachers_encoding_of_prompt_then_response(
    scored, generated, tiny_teacher, tokenizer
):
    inside = outside = 0
    for pid, gen in generated.items():
        rec = records(scored)[pid]
        prompt, response = f"Line {pid[1:]}: the answer is", gen["response"]
        p = tokenize(tiny_teacher, prompt=prompt)
        r = tokenize(tiny_teacher, prompt=response, add_special_tokens=False)
        assert rec["prompt_token_ids"] + rec["token_ids"] == p + r
        assert p + r == tokenizer.encode(prompt) + tokenizer.encode(
            response, add_special_tokens=False
        )
        assert rec["prompt_token_ids"] == p[:1]
        assert rec["loss_mask"] == [False] * (len(p) - 1) + [True] * len(r)
        assert (rec["response"], rec["finish_reason"]) == (response, "score")
        for tid, lp, ids, lps in zip(
            rec["token_ids"], rec["logprobs"], rec["top_token_ids"], rec["top_logprobs"],
            strict=True,
        ):  # fmt: skip
            assert len(ids) == len(set(ids)) == len(lps) == K
            assert lps == sorted(lps, reverse=True)
            if tid in ids:  # vLLM sent K keys: the token's own entry is one of the top K
                inside += 1
                assert math.isclose(lps[ids.index(tid)], lp, abs_tol=1e-6)
            else:  # K + 1 keys: the added entry was dropped, and it ranks below the K-th
                outside += 1
                assert lp <= lps[-1] + 1e-6
    assert inside and outside  # both shapes of vLLM's answer were met and parsed


def test_scored_logprobs_equal_the_greedy_generation_logprobs(scored, generated):
    compared = 0
    for pid, gen in generated.items():
        rec = records(scored)[pid]
        start = len(gen["prompt_token_ids"]) - 1  # index of the response in rec["token_ids"]
        if rec["token_ids"][start:] != gen["token_ids"]:
            continue  # the text re-encodes to other ids (BPE is not unique): nothing to compare
        assert rec["token_ids"][:start] == gen["prompt_token_ids"][1:]
        compared += 1
        for j, tid in enumerate(gen["token_ids"]):
            assert math.isclose(rec["logprobs"][start + j], gen["logprobs"][j], abs_tol=1e-3)
            assert rec["token_ids"][start + j] == tid
            for a, b in zip(rec["top_logprobs"][start + j], gen["top_logprobs"][j], strict=True):
                assert math.isclose(a, b, abs_tol=1e-3)
    assert compared >= ROWS * 3 // 4, f"only {compared} of {ROWS} responses re-encode exactly"


def chat_by_hand(tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """TWO_TURNS' ids built from the template's pieces, and where each assistant turn lies."""
    ids, turns = [], []
    for text, trained in PIECES:
        piece = tokenizer.encode(text, add_special_tokens=False)
        if trained:
            turns.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return ids, turns


def test_chat_mask_covers_exactly_both_assistant_turns(scored, tiny_teacher, tokenizer):
    rec = records(scored)["two-turns"]
    ids, turns = chat_by_hand(tokenizer)
    mask = [any(a <= i < b for a, b in turns) for i in range(len(ids))]
    whole = tokenize(tiny_teacher, messages=TWO_TURNS, add_generation_prompt=False)
    assert rec["prompt_token_ids"] + rec["token_ids"] == ids == whole
    assert rec["loss_mask"] == mask[1:]
    on = [i + 1 for i, m in enumerate(rec["loss_mask"]) if m]  # positions in the whole sequence
    assert on == [*range(*turns[0]), *range(*turns[1])]
    spans = [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in turns]
    # Each span is the turn's content, then <|im_end|> and the template's newline. (The tiny
    # test tokenizer has no token for a space byte, so compare with the content's own decoding.)
    said = [tokenizer.decode(tokenizer.encode(m["content"], add_special_tokens=False))
            for m in TWO_TURNS if m["role"] == "assistant"]  # fmt: skip
    assert spans == [f"{text}<|im_end|>\n" for text in said]
    assert said == ["Hellothere.", "Thenwestop."]
    assert rec["response"] == "Then we stop." and rec["api"] == "chat"


def test_iter_batches_masks_the_scored_tokens(scored, tiny_teacher, tokenizer):
    """Position t predicts token t + 1: trained exactly where that token is a response token."""
    batches = pytest.importorskip("harvest.training.batches")
    length, seen = 256, 0
    _, turns = chat_by_hand(tokenizer)
    padded = batches.iter_batches(scored, 8, length, meta_columns=["prompt_id"], pad_to="max_len")
    for batch in padded:
        for b, pid in enumerate(batch["prompt_id"]):
            rec = records(scored)[pid]
            seq = rec["prompt_token_ids"] + rec["token_ids"]
            assert list(batch["input_ids"][b, : len(seq)]) == seq
            if pid == "two-turns":
                want = [any(a <= t + 1 < e for a, e in turns) for t in range(length)]
            else:  # the response starts after the prompt's own tokens
                n_prompt = len(tokenize(tiny_teacher, prompt=f"Line {pid[1:]}: the answer is"))
                want = [n_prompt - 1 <= t < len(seq) - 1 for t in range(length)]
            assert batch["loss_mask"][b].tolist() == want
            seen += 1
    assert seen == ROWS + 1


def test_a_rerun_resumes_and_changes_nothing(scored):
    before = reader.read_table(scored).sort_by("request_id")
    assert main(["run", str(scored.parent / "job.yaml"), "--no-progress"]) == 3
    assert reader.read_table(scored).sort_by("request_id").equals(before)
