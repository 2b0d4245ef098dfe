"""Unit tests for reading input files, row validation, scanning and work-unit cutting."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest.sources import (
    RAW_LIMIT,
    InputError,
    iter_rows,
    iter_units,
    resolve_files,
    scan,
)
from schemas.job import JobSpec, load_job, parse_job
from schemas.records import MESSAGE_TYPE
from schemas.wire import PromptRow, RowProblem

AUTH = {"owner": "o", "license": "apache-2.0", "attestation": "ours"}


def make_spec(pattern: str | Path, sampling: dict[str, Any] | None = None, **cols: Any) -> JobSpec:
    return parse_job(
        {
            "input": {"path": str(pattern), **cols},
            "teacher": {"model": "m", "endpoints": ["http://h:8000"], "authorization": AUTH},
            "sampling": sampling or {},
        }
    )


def write_jsonl(path: Path, *lines: Any) -> Path:
    """Each line: bytes as-is, str encoded, anything else JSON-encoded."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(orjson.dumps(line))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(x + b"\n" for x in out))
    return path


def read(path: Path, **cols: Any) -> list[PromptRow | RowProblem]:
    spec = make_spec(path, **cols)
    [f] = resolve_files(spec.input.path)
    return list(iter_rows(f, spec))


def one(path: Path, line: Any, **cols: Any) -> PromptRow | RowProblem:
    [row] = read(write_jsonl(path, line), **cols)
    return row


USER = {"role": "user", "content": "hi"}


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


# --- resolve_files and scan --------------------------------------------------------------------


def test_glob_names_files_relative_to_glob_base(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", {"prompt": "a"})
    write_jsonl(tmp_path / "in" / "sub" / "b.jsonl", {"prompt": "b"})
    write_jsonl(tmp_path / "in" / "sub" / "deeper" / "c.ndjson", {"prompt": "c"})
    files = resolve_files(str(tmp_path / "in" / "**" / "*.*json*"))
    assert [f.name for f in files] == ["a.jsonl", "sub/b.jsonl", "sub/deeper/c.ndjson"]
    assert [f.path for f in files] == [
        str(tmp_path / "in" / "a.jsonl"),
        str(tmp_path / "in" / "sub" / "b.jsonl"),
        str(tmp_path / "in" / "sub" / "deeper" / "c.ndjson"),
    ]
    spec = make_spec(tmp_path / "in" / "**" / "*.*json*")
    ids = [r.prompt_id for u in iter_units(files, spec, 10) for r in u.rows]
    assert ids == ["a.jsonl:1", "sub/b.jsonl:1", "sub/deeper/c.ndjson:1"]


def test_plain_path_is_named_by_its_file_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d" / "p.jsonl", {"prompt": "a"})
    [f] = resolve_files(str(path))
    assert (f.path, f.name) == (str(path), "p.jsonl")


def test_literal_path_with_glob_characters(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "run[1]" / "p.jsonl", {"prompt": "a"})
    [f] = resolve_files(str(path))
    assert f.name == "p.jsonl"


def test_nonexistent_input_names_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "missing" / "*.jsonl")
    with pytest.raises(InputError, match="no file matches") as exc:
        scan(make_spec(pattern))
    assert repr(pattern) in str(exc.value)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(InputError, match="unsupported input type") as exc:
        resolve_files(str(path))
    assert str(path) in str(exc.value)
    write_jsonl(tmp_path / "q.jsonl", {"prompt": "b"})
    with pytest.raises(InputError, match=r"p\.txt: unsupported"):
        scan(make_spec(tmp_path / "*"))


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_input_has_no_rows(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match="no rows") as exc:
        scan(make_spec(path))
    assert str(path) in str(exc.value)


def test_scan_counts_rows_and_problems(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a"}, "{oops", "", {"prompt": 1})
    result = scan(make_spec(path))
    assert (result.rows, result.problems) == (3, 2)
    assert [f.name for f in result.files] == ["p.jsonl"]


def test_scan_records_the_kinds_of_valid_rows(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    both = write_jsonl(tmp_path / "both.jsonl", {"prompt": "a"}, chat, "not json")
    assert scan(make_spec(both)).kinds == {"chat", "completions"}
    only_chat = write_jsonl(tmp_path / "chat.jsonl", chat, {"prompt": 5})  # a bad prompt row
    assert scan(make_spec(only_chat)).kinds == {"chat"}
    only_bad = write_jsonl(tmp_path / "bad.jsonl", {"prompt": 5}, {"messages": []})
    assert scan(make_spec(only_bad)).kinds == frozenset()  # nothing to probe: all failure rows


def test_duplicate_ids_within_a_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", {"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"})
    with pytest.raises(InputError, match="duplicate ids") as exc:
        scan(make_spec(path))
    assert f"'x' at {path}:1 and {path}:2" in str(exc.value)


def test_duplicate_ids_across_files_and_types(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", {"id": 1, "prompt": "a"})
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["1"], "prompt": ["b"]}), b)
    with pytest.raises(InputError, match="duplicate ids") as exc:
        scan(make_spec(tmp_path / "*"))
    assert f"'1' at {a}:1 and {b}#0" in str(exc.value)


def test_fingerprint_stable_and_content_sensitive(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a"}, {"prompt": "b"})
    spec = make_spec(path)
    first = scan(spec).fingerprint
    assert scan(spec).fingerprint == first
    assert len(first) == 16
    write_jsonl(path, {"prompt": "a"}, {"prompt": "c"})
    assert scan(spec).fingerprint != first
    write_jsonl(path, {"prompt": "a"}, {"prompt": "b"})
    assert scan(spec).fingerprint == first


def test_fingerprint_changes_when_a_file_is_added(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", {"prompt": "a"})
    spec = make_spec(tmp_path / "*.jsonl")
    first = scan(spec).fingerprint
    write_jsonl(tmp_path / "b.jsonl", {"prompt": "b"})
    assert scan(spec).fingerprint != first


# --- work units --------------------------------------------------------------------------------


def unit_layout(files: Any, spec: JobSpec, n: int) -> list[tuple[str, list[str]]]:
    return [(u.unit_id, [r.prompt_id for r in u.rows]) for u in iter_units(files, spec, n)]


def test_iter_units_deterministic_per_file_and_sized(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", *({"prompt": f"a{i}"} for i in range(5)))
    write_jsonl(tmp_path / "b.jsonl", {"prompt": "b0"}, "{bad", {"prompt": "b2"})
    spec = make_spec(tmp_path / "*.jsonl")
    files = scan(spec).files
    layout = unit_layout(files, spec, 2)
    assert layout == unit_layout(files, spec, 2)  # same input, same units

    rows_per_unit = [ids for _, ids in layout]
    assert rows_per_unit == [
        ["a.jsonl:1", "a.jsonl:2"],
        ["a.jsonl:3", "a.jsonl:4"],
        ["a.jsonl:5"],
        ["b.jsonl:1", "b.jsonl:2"],  # problems travel with their unit
        ["b.jsonl:3"],
    ]
    unit_ids = [uid for uid, _ in layout]
    assert len(set(unit_ids)) == len(unit_ids)
    assert [uid.rsplit("-", 1)[1] for uid in unit_ids] == [
        "000000",
        "000001",
        "000002",
        "000000",
        "000001",
    ]
    assert unit_ids[0].startswith("a_jsonl-")
    assert unit_ids[3].startswith("b_jsonl-")
    # each unit comes from a single file
    for _, ids in layout:
        assert len({i.split(":")[0] for i in ids}) == 1


@pytest.mark.parametrize("per_unit", [1, 3, 7, 100])
def test_every_row_in_exactly_one_unit(tmp_path: Path, per_unit: int) -> None:
    write_jsonl(tmp_path / "x" / "a.jsonl", *({"prompt": f"a{i}"} for i in range(10)))
    pq.write_table(pa.table({"prompt": [f"b{i}" for i in range(4)]}), tmp_path / "x" / "b.parquet")
    spec = make_spec(tmp_path / "x" / "*")
    result = scan(spec)
    units = list(iter_units(result.files, spec, per_unit))
    ids = Counter(r.prompt_id for u in units for r in u.rows)
    assert sum(ids.values()) == result.rows == 14
    assert set(ids.values()) == {1}
    assert all(1 <= len(u.rows) <= per_unit for u in units)


def test_unit_ids_differ_for_similar_file_names(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a-b.jsonl", {"prompt": "x"})
    write_jsonl(tmp_path / "a_b.jsonl", {"prompt": "y"})
    spec = make_spec(tmp_path / "*.jsonl")
    ids = [u.unit_id for u in iter_units(scan(spec).files, spec, 5)]
    assert len(set(ids)) == 2


# --- score mode --------------------------------------------------------------------------------


def test_score_rows_need_a_response_or_an_assistant_turn(tmp_path: Path) -> None:
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "hello"}
    path = write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "ok", "prompt": "p", "response": "r", "sampling": {"n": 5}},
        {"id": "chat", "messages": [user, answer, user]},
        {"id": "no-response", "prompt": "p"},
        {"id": "empty", "prompt": "p", "response": ""},
        {"id": "number", "prompt": "p", "response": 3},
        {"id": "no-assistant", "messages": [user]},
        {"id": "both", "messages": [user, answer], "response": "r"},
        {"id": "first", "messages": [answer, user, answer]},
    )
    spec = parse_job({**make_spec(path).model_dump(), "mode": "score"})
    rows = list(iter_rows(resolve_files(str(path))[0], spec))
    ok, chat = rows[0], rows[1]
    assert isinstance(ok, PromptRow) and ok.response == "r" and ok.overrides == {}
    assert isinstance(chat, PromptRow) and chat.messages == [user, answer, user]
    problems = {r.prompt_id: r.reason for r in rows[2:] if isinstance(r, RowProblem)}
    assert problems == {
        "no-response": "score mode: row has no 'response' to score",
        "empty": "score mode: 'response' must be a non-empty string",
        "number": "score mode: 'response' must be a non-empty string",
        "no-assistant": "score mode: the conversation has no assistant turn",
        "both": "score mode: a chat row carries its responses as assistant turns, not in "
        "'response'",
        "first": "score mode: the conversation starts with an assistant turn, so nothing "
        "precedes it for the chat template to render",
    }


def test_generate_mode_does_not_read_the_response_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", {"id": "a", "prompt": "p", "response": 3})
    (row,) = iter_rows(resolve_files(str(path))[0], make_spec(path))
    assert isinstance(row, PromptRow) and row.response is None


def test_the_score_example_reads_as_score_rows() -> None:
    spec = load_job(Path(__file__).resolve().parents[2] / "examples" / "score_job.yaml")
    assert spec.mode == "score"
    rows = list(iter_rows(resolve_files(spec.input.path)[0], spec))
    assert all(isinstance(r, PromptRow) for r in rows) and len(rows) == 3
    assert rows[0].response == " Paris, on the Seine." and rows[2].messages is not None
