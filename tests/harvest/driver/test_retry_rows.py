"""retry-failed re-sends what may now succeed, never rows that failed as InvalidInput."""

from __future__ import annotations

from harvest.driver.retry import retry_rows
from schemas.wire import PromptRow, RowProblem


def test_invalid_input_rows_are_carried_over_not_resent() -> None:
    rows = [
        PromptRow("a", "in.jsonl:1", prompt="fine"),
        PromptRow("b", "in.jsonl:2", prompt="unscoreable", response="x"),
        RowProblem("c", "in.jsonl:3", "malformed JSON", raw="{"),
        PromptRow("d", "in.jsonl:4", prompt="never failed"),
    ]
    failed = {
        "a": ("ServerError", "503"),
        "b": ("InvalidInput", "no assistant token to score"),
        "c": ("InvalidInput", "malformed JSON"),
    }
    out, kept = retry_rows(rows, failed)
    assert [r.prompt_id for r in out] == ["a", "b", "c"]  # every failure stays recorded
    assert isinstance(out[0], PromptRow)  # sent again
    assert isinstance(out[1], RowProblem) and out[1].reason == "no assistant token to score"
    assert isinstance(out[2], RowProblem)  # becomes a failure record without a request
    assert kept == {"InvalidInput": 2}
