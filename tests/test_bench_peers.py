"""Smoke test of bench/peers.py's building blocks on a few prompts (no timing, no Ray): the
memoised synthetic teacher answers vLLM-shaped bodies for the request's own prompt, the bare
aiohttp contender writes the shared columns, and the summary computes marginal rates."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from fake_teacher import prompt_ids, render_chat
from fault_teacher_server import FaultTeacherServer

from workers.answers.parse import parse_completions

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import peer_clients  # noqa: E402
import peers  # noqa: E402
from synthetic import memoise_answers  # noqa: E402


def test_memoised_answers_carry_the_requests_prompt_and_k_plus_1() -> None:
    server = FaultTeacherServer(model="fault")
    memoise_answers(server, vocab=32_000, variants=2)
    seen = set()
    for i in range(6):
        req = {"model": "fault", "prompt": f"p{i}", "max_tokens": 64, "logprobs": 20}
        req |= {"return_token_ids": True, "return_tokens_as_token_ids": True}
        raw = orjson.loads(orjson.dumps(server.fake.answer(req)))
        answer = parse_completions(raw, 20)
        assert answer.prompt_token_ids == prompt_ids(req) == raw["choices"][0]["prompt_token_ids"]
        assert answer.prompt_tokens == len(answer.prompt_token_ids)
        tops = raw["choices"][0]["logprobs"]["top_logprobs"]
        assert {len(e) for e in tops} <= {20, 21}
        seen.add(tuple(answer.samples[0].token_ids))
    assert len(seen) == 2  # one body per variant slot, reused


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_bare_contender_writes_the_shared_columns(tmp_path: Path, api: str) -> None:
    server = FaultTeacherServer(model="fault")
    memoise_answers(server)
    with server:
        peers.write_prompts(tmp_path / "p.jsonl", api, 5)
        args = {"url": server.url, "api": api, "prompts": str(tmp_path / "p.jsonl")}
        args |= {"max_tokens": 8, "k": 20, "in_flight": 4}
        asyncio.run(peer_clients._bare(args, tmp_path))
        tokenized = sum(r.path == "/tokenize" for r in server.log)
    table = pq.read_table(tmp_path / "part-0.parquet")
    assert table.schema == peer_clients.schema(20)
    assert sorted(table["prompt_id"].to_pylist()) == [f"{api}-{i}" for i in range(5)]
    assert peers.count_output(tmp_path) == (5, 40)
    assert tokenized == (5 if api == "chat" else 0)
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["top_token_ids"]) == 8 and all(len(t) == 20 for t in row["top_token_ids"])
    lps = row["top_logprobs"][0]
    assert lps == sorted(lps, reverse=True)


def test_summary_marginal_rates_and_did_not_finish() -> None:
    def run(c: str, n: int, cpu: float, wall: float, ok: bool = True) -> dict:
        return {
            "contender": c, "api": "completions", "prompts": n, "finished": ok,
            "tokens": n * 10 if ok else 0, "cpu_s": cpu, "wall_s": wall,
            "peak_rss_mb_total": 100.0, "peak_rss_mb_by_kind": {"driver": 100.0},
            "machine_busy_cores": 1.0,
        }  # fmt: skip

    runs = [run("harvest", 100, 5.0, 10.0), run("harvest", 500, 7.0, 12.0)]
    runs += [run("raydata", 10, 20.0, 30.0), run("raydata", 50, 60.0, 240.0, ok=False)]
    lines = {ln["contender"]: ln for ln in peers.summarise(runs)}
    assert lines["harvest"]["marginal_tok_per_cpu_s"] == pytest.approx(4000 / 2.0)
    assert lines["harvest"]["marginal_tok_per_wall_s"] == pytest.approx(4000 / 2.0)
    assert "did not finish 50 prompts" in lines["raydata"]["note"]
    assert "marginal_tok_per_cpu_s_vs_raydata" not in lines["harvest"]
    assert "did not finish" in peers.markdown(
        {"date": "d", "command": "c", "summary": list(lines.values()), "config": {
            "max_tokens": 1, "k": 1, "in_flight": 1, "workers": 1, "batch_size": 1,
            "ray_concurrency": 1, "cap_s": 1.0, "sizes": [1, 2], "raydata_sizes": [1, 2]}}
    )  # fmt: skip


def test_raydata_chat_columns_match_the_completions_columns() -> None:
    """Ray Data's chat path (/v1/chat/completions) and the completions path of the same
    rendered ids give the same shared columns on the memoised teacher."""
    server = FaultTeacherServer(model="fault")
    memoise_answers(server, vocab=32_000, variants=2)
    args = {"max_tokens": 8, "k": 20}
    messages = [{"role": "user", "content": "tell me"}]
    chat = orjson.loads(
        orjson.dumps(server.fake.chat_answer(peer_clients._chat_body(args, messages)))
    )
    ids = render_chat(messages, add_generation_prompt=True)
    plain = orjson.loads(orjson.dumps(server.fake.answer(peer_clients._body(args, ids))))
    got = peer_clients._chat_columns(chat, 20)
    want = peer_clients._columns(plain["choices"][0], 20)
    assert got == want and got["prompt_token_ids"] == ids
    assert all(len(t) == 20 for t in got["top_token_ids"])
