"""Which rows retry-failed sends again: what may now succeed; never an InvalidInput row, nor an
ids row's sibling sample, nor a round's row some of whose samples were committed."""

from __future__ import annotations

import jobs

from harvest.driver.retry import Failed, retry_rows
from schemas.wire import PromptRow, RowProblem


def spec(mode: str, n: int = 1):
    extra = {"student": jobs.model()} if mode == "round" else {}
    return jobs.spec(jobs.model(), mode=mode, sampling={"n": n}, **extra)


def failed(*records: tuple[str, int], cls: str = "ServerError") -> dict[str, list[Failed]]:
    out: dict[str, list[Failed]] = {}
    for pid, index in records:
        out.setdefault(pid, []).append(Failed(index, f"r-{pid}-{index}", cls, "503"))
    return out


def ids_row(pid: str, index: int) -> PromptRow:
    return PromptRow(pid, "x", prompt_token_ids=[1], token_ids=[2], sample_index=index)


def sent(out) -> list[str]:
    return [r.prompt_id for r in out if isinstance(r, PromptRow)]


def test_an_ids_row_is_retried_only_for_its_own_sample():
    got = failed(("p", 1))
    assert sent(retry_rows(spec("score"), [ids_row("p", 1)], got)[0]) == ["p"]
    assert retry_rows(spec("score"), [ids_row("p", 0)], got)[0] == []
    bad = RowProblem("p", "x", "no ids", sample_index=1, request_id="r1")
    out, kept = retry_rows(spec("score"), [bad], failed(("p", 1), cls="InvalidInput"))
    assert out and isinstance(out[0], RowProblem) and out[0].request_id == "r-p-1"
    assert kept == {"InvalidInput": 1}


def test_a_round_row_is_retried_only_when_every_sample_failed():
    row = PromptRow("p", "x", prompt="hi")
    out, kept = retry_rows(spec("round", n=3), [row], failed(("p", 1)))
    assert sent(out) == [] and kept == {"ServerError": 1}
    # the failed sample stays a failure record under its own key, nothing else
    assert [(r.sample_index, r.request_id) for r in out] == [(1, "r-p-1")]
    out, _ = retry_rows(spec("round", n=3), [row], failed(("p", 0), ("p", 1), ("p", 2)))
    assert sent(out) == ["p"]


def test_a_plain_row_is_retried_when_any_record_failed():
    out, _ = retry_rows(spec("generate", n=2), [PromptRow("p", "x", prompt="hi")], failed(("p", 1)))
    assert sent(out) == ["p"]
    assert (
        retry_rows(spec("generate"), [PromptRow("q", "x", prompt="hi")], failed(("p", 0)))[0] == []
    )


def test_invalid_input_rows_are_carried_over_not_resent() -> None:
    rows = [
        PromptRow("a", "in.jsonl:1", prompt="fine"),
        PromptRow("b", "in.jsonl:2", prompt="unscoreable", response="x"),
        RowProblem("c", "in.jsonl:3", "malformed JSON", raw="{"),
        PromptRow("d", "in.jsonl:4", prompt="never failed"),
    ]
    records = {
        "a": [Failed(0, "ra", "ServerError", "503")],
        "b": [Failed(0, "rb", "InvalidInput", "no assistant token to score")],
        "c": [Failed(0, "rc", "InvalidInput", "malformed JSON")],
    }
    out, kept = retry_rows(spec("generate"), rows, records)
    assert [r.prompt_id for r in out] == ["a", "b", "c"]  # every failure stays recorded
    assert isinstance(out[0], PromptRow)  # sent again
    assert isinstance(out[1], RowProblem) and out[1].reason == "no assistant token to score"
    assert isinstance(out[2], RowProblem)  # becomes a failure record without a request
    assert kept == {"InvalidInput": 2}
