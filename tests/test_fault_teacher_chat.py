"""The fault teacher's ``/v1/chat/completions``: the completions answer for the rendered ids,
in vLLM's chat shape, plain and memoised as the peers bench runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from fake_teacher import render_chat
from fault_teacher_server import FaultPlan, FaultTeacherServer

from workers.answers.parse import parse_completions


@pytest.mark.parametrize("memoised", [False, True])
def test_chat_completions_is_the_completions_answer_in_vllms_chat_shape(memoised: bool) -> None:
    server = FaultTeacherServer(plan=FaultPlan())
    if memoised:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from synthetic import memoise_answers

        memoise_answers(server, vocab=32_000, variants=2)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    chat = {"model": "fault", "messages": messages, "max_tokens": 16, "logprobs": True}
    chat |= {"top_logprobs": 3, "temperature": 1.0, "n": 1}
    chat |= {"return_tokens_as_token_ids": True, "return_token_ids": True}
    ids = render_chat(messages, add_generation_prompt=True)
    plain = {"model": "fault", "prompt": ids, "max_tokens": 16, "logprobs": 3, "n": 1}
    plain |= {"temperature": 1.0, "return_tokens_as_token_ids": True, "return_token_ids": True}
    with server, httpx.Client() as h:
        got = h.post(f"{server.url}/chat/completions", json=chat)
        want = h.post(f"{server.url}/completions", json=plain).json()
    assert got.status_code == 200
    answer = got.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "fault"
    assert answer["usage"]["prompt_tokens"] == len(ids) == len(answer["prompt_token_ids"])
    assert answer["prompt_token_ids"] == ids
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": want["choices"][0]["text"]}
    parsed = parse_completions(want, 3).samples[0]
    content = choice["logprobs"]["content"]
    assert [int(e["token"].removeprefix("token_id:")) for e in content] == parsed.token_ids
    assert choice["token_ids"] == parsed.token_ids
    assert [e["logprob"] for e in content] == pytest.approx(parsed.logprobs)
    for entry, top_ids, top_lps in zip(
        content, parsed.top_token_ids, parsed.top_logprobs, strict=True
    ):
        assert entry["bytes"] == list(entry["token"].encode())
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and set(tops[0]) == {"token", "logprob", "bytes"}
        assert [int(t["token"][9:]) for t in tops] == list(top_ids)
        assert [t["logprob"] for t in tops] == pytest.approx(list(top_lps))
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
    assert [(r.path, r.key, r.outcome) for r in server.log] == [
        ("/v1/chat/completions", "héllo", "ok"),
        ("/v1/completions", "héllo", "ok"),
    ]
