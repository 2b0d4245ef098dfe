"""Reading input files: valid rows (JSONL and Parquet) and the problems bad rows become."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from source_rows import USER, one, read, write_jsonl

from harvest.inputs.sources import RAW_LIMIT, InputError
from schemas.records import MESSAGE_TYPE
from schemas.wire import PromptRow, RowProblem

# --- valid rows --------------------------------------------------------------------------------


def test_jsonl_prompt_and_chat_rows_with_derived_ids(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "hello"},
        "",
        "   ",
        {"messages": [{"role": "system", "content": "be brief"}, {**USER, "name": "x"}]},
        {"prompt": "again", "sampling": {"temperature": 0.5, "stop": ["\n"]}},
    )
    assert read(path) == [
        PromptRow("p.jsonl:1", f"{path}:1", prompt="hello"),
        PromptRow(
            "p.jsonl:4",
            f"{path}:4",
            messages=[{"role": "system", "content": "be brief"}, USER],  # extra keys dropped
        ),
        PromptRow(
            "p.jsonl:5", f"{path}:5", prompt="again", overrides={"temperature": 0.5, "stop": ["\n"]}
        ),
    ]
    assert [r.api for r in read(path)] == ["completions", "chat", "completions"]


def test_explicit_ids_used_and_ints_become_strings(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        {"id": 7, "prompt": "a"},
        {"id": "q-1", "prompt": "b"},
        {"prompt": "c"},
        {"id": None, "prompt": "d"},
    )
    assert [r.prompt_id for r in read(path)] == ["7", "q-1", "p.jsonl:3", "p.jsonl:4"]


def test_custom_column_names(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        {"key": "k1", "text": "hello", "params": {"max_tokens": 3}},
        {"key": "k2", "chat": [USER]},
    )
    rows = read(
        path, prompt_field="text", messages_field="chat", id_field="key", overrides_field="params"
    )
    assert rows == [
        PromptRow("k1", f"{path}:1", prompt="hello", overrides={"max_tokens": 3}),
        PromptRow("k2", f"{path}:2", messages=[USER]),
    ]


def test_very_long_prompt_is_a_valid_row(tmp_path: Path) -> None:
    text = "x" * 100_000
    row = one(tmp_path / "p.jsonl", {"prompt": text})
    assert isinstance(row, PromptRow)
    assert row.prompt == text


def test_parquet_rows_with_messages_column(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    table = pa.table(
        {
            "prompt": pa.array(["a", None, "c"], pa.string()),
            "messages": pa.array(
                [
                    None,
                    [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                    None,
                ],
                pa.list_(MESSAGE_TYPE),
            ),
        }
    )
    pq.write_table(table, path)
    assert read(path) == [
        PromptRow("p.parquet#0", f"{path}#0", prompt="a"),
        PromptRow(
            "p.parquet#1",
            f"{path}#1",
            messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        ),
        PromptRow("p.parquet#2", f"{path}#2", prompt="c"),
    ]


def test_parquet_int_ids_and_problems(tmp_path: Path) -> None:
    path = tmp_path / "p.pq"
    pq.write_table(pa.table({"id": [10, 11], "prompt": ["a", ""]}), path)
    ok, bad = read(path)
    assert ok == PromptRow("10", f"{path}#0", prompt="a")
    assert isinstance(bad, RowProblem)
    assert (bad.prompt_id, bad.source, bad.reason) == ("11", f"{path}#1", "'prompt' is empty")
    assert orjson.loads(bad.raw or "") == {"id": 11, "prompt": ""}


def test_parquet_rows_span_batches(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(2500)]}), path, row_group_size=700)
    rows = read(path)
    assert len(rows) == 2500
    assert rows[2499] == PromptRow("big.parquet#2499", f"{path}#2499", prompt="p2499")


def test_corrupt_parquet_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read Parquet") as exc:
        read(path)
    assert str(path) in str(exc.value)


def test_parquet_struct_overrides_with_nulls(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    sampling = pa.array(
        [{"temperature": 0.5, "max_tokens": None}],
        pa.struct([("temperature", pa.float64()), ("max_tokens", pa.int64())]),
    )
    pq.write_table(pa.table({"prompt": ["a"], "sampling": sampling}), path)
    [row] = read(path)
    assert row == PromptRow("p.parquet#0", f"{path}#0", prompt="a", overrides={"temperature": 0.5})


# --- row problems ------------------------------------------------------------------------------


BAD_ROWS = [
    pytest.param(b'{"prompt": "a",', "malformed JSON line", id="malformed"),
    pytest.param(b'{"prompt": "caf\xe9"}', "not valid UTF-8", id="bad-utf8"),
    pytest.param(b'["a", "b"]', "expected a JSON object, got list", id="array"),
    pytest.param(b'"text"', "expected a JSON object, got str", id="string"),
    pytest.param({"prompt": ""}, "'prompt' is empty", id="empty"),
    pytest.param({"prompt": " \n\t"}, "'prompt' is empty", id="blank"),
    pytest.param({"prompt": "a", "messages": [USER]}, "both 'prompt' and 'messages'", id="both"),
    pytest.param({"text": "a"}, "neither 'prompt' nor 'messages'", id="neither"),
    pytest.param({"prompt": 5}, "'prompt' must be a string, got int", id="prompt-int"),
    pytest.param({"messages": []}, "'messages' must be a non-empty list", id="no-messages"),
    pytest.param({"messages": "hi"}, "'messages' must be a non-empty list", id="messages-str"),
    pytest.param(
        {"messages": [USER, {"role": "robot", "content": "x"}]},
        "'messages[1].role' must be one of",
        id="bad-role",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": 3}]},
        "'messages[0]' needs a string 'content'",
        id="content-int",
    ),
    pytest.param({"messages": ["hi"]}, "'messages[0]' needs a string 'content'", id="msg-str"),
    pytest.param(
        {"prompt": "a", "sampling": {"logprobs": 3}},
        "'sampling' has keys that cannot be overridden per row: ['logprobs']",
        id="override-unknown",
    ),
    pytest.param(
        {"prompt": "a", "sampling": {"temperature": -1}},
        "'sampling.temperature': Input should be greater than or equal to 0",
        id="override-invalid",
    ),
    pytest.param(
        {"prompt": "a", "sampling": {"n": 0}}, "'sampling.n': Input should be greater", id="n-0"
    ),
    pytest.param({"prompt": "a", "sampling": 3}, "'sampling' must be an object", id="override-int"),
    pytest.param({"id": True, "prompt": "a"}, "'id' must be a string or integer", id="bool-id"),
    pytest.param({"id": 1.5, "prompt": "a"}, "'id' must be a string or integer", id="float-id"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS)
def test_bad_rows_become_problems(tmp_path: Path, line: Any, reason: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", {"prompt": "fine"}, line)
    ok, row = read(path)
    assert isinstance(ok, PromptRow)
    assert isinstance(row, RowProblem)
    assert reason in row.reason
    assert (row.prompt_id, row.source) == ("p.jsonl:2", f"{path}:2")
    raw = line if isinstance(line, bytes) else orjson.dumps(line)
    assert row.raw == raw.decode("utf-8", errors="replace")


def test_problem_keeps_explicit_id(tmp_path: Path) -> None:
    row = one(tmp_path / "p.jsonl", {"id": "q9", "prompt": ""})
    assert isinstance(row, RowProblem)
    assert row.prompt_id == "q9"


def test_problem_reason_uses_custom_field_names(tmp_path: Path) -> None:
    row = one(tmp_path / "p.jsonl", {"text": 1}, prompt_field="text", messages_field="chat")
    assert isinstance(row, RowProblem)
    assert row.reason == "'text' must be a string, got int"


def test_problem_raw_is_truncated(tmp_path: Path) -> None:
    row = one(tmp_path / "p.jsonl", {"prompt": 1, "pad": "y" * 50_000})
    assert isinstance(row, RowProblem)
    assert row.raw is not None
    assert len(row.raw) == RAW_LIMIT


def test_unhashable_role_is_a_problem(tmp_path: Path) -> None:
    row = one(tmp_path / "p.jsonl", {"messages": [{"role": ["user"], "content": "hi"}]})
    assert isinstance(row, RowProblem)
    assert "'messages[0].role'" in row.reason


def test_overrides_carry_validated_types(tmp_path: Path) -> None:
    row = one(tmp_path / "p.jsonl", {"prompt": "a", "sampling": {"n": "2", "temperature": "0.5"}})
    if isinstance(row, PromptRow):  # rejecting the row would be fine too
        assert row.overrides == {"n": 2, "temperature": 0.5}
        assert type(row.overrides["n"]) is int
