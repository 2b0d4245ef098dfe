"""Which rows retry-failed sends again: a failed sample of an ids row, never its siblings."""

from __future__ import annotations

from collections import Counter

from harvest.driver.retry_rows import to_retry
from schemas.job import parse_job
from schemas.wire import PromptRow, RowProblem

AUTH = {"owner": "us", "license": "apache-2.0", "attestation": "t"}
MODEL = {"model": "m", "endpoints": ["http://127.0.0.1:8000"], "authorization": AUTH}


def spec(mode: str, n: int = 1):
    extra = {"student": MODEL} if mode == "round" else {}
    return parse_job(
        {"mode": mode, "input": "x.jsonl", "teacher": MODEL, "sampling": {"n": n}, **extra}
    )


def failed(*pairs: tuple[str, int]) -> Counter:
    return Counter(pairs) + Counter((p, None) for p, _ in pairs)


def ids_row(pid: str, index: int) -> PromptRow:
    return PromptRow(pid, "x", prompt_token_ids=[1], token_ids=[2], sample_index=index)


def test_an_ids_row_is_retried_only_for_its_own_sample():
    got = failed(("p", 1))
    assert to_retry(spec("score"), ids_row("p", 1), got)
    assert not to_retry(spec("score"), ids_row("p", 0), got)
    bad = RowProblem("p", "x", "no ids", sample_index=1, request_id="r1")
    assert to_retry(spec("score"), bad, got)


def test_a_round_row_is_retried_only_when_every_sample_failed():
    row = PromptRow("p", "x", prompt="hi")
    assert not to_retry(spec("round", n=3), row, failed(("p", 1)))
    assert to_retry(spec("round", n=3), row, failed(("p", 0), ("p", 1), ("p", 2)))


def test_a_plain_row_is_retried_when_any_record_failed():
    assert to_retry(spec("generate", n=2), PromptRow("p", "x", prompt="hi"), failed(("p", 1)))
    assert not to_retry(spec("generate"), PromptRow("q", "x", prompt="hi"), failed(("p", 0)))
