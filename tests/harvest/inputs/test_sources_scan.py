"""Scanning inputs (files, counts, duplicate ids, fingerprints), cutting work units, and
reading rows in score mode."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from source_rows import make_spec, write_jsonl

from harvest.inputs.sources import InputError, iter_rows, iter_units, resolve_files, scan
from harvest.jobfile import load_job
from schemas.job import JobSpec, parse_job
from schemas.wire import PromptRow, RowProblem

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
    spec = load_job(Path(__file__).resolve().parents[3] / "examples" / "score_job.yaml")
    assert spec.mode == "score"
    rows = list(iter_rows(resolve_files(spec.input.path)[0], spec))
    assert all(isinstance(r, PromptRow) for r in rows) and len(rows) == 3
    assert rows[0].response == " Paris, on the Seine." and rows[2].messages is not None
