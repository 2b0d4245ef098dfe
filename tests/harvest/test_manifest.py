"""Unit tests for the output folder's manifest: new jobs, commits, resume checks, cleanup."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from harvest.manifest import MANIFEST, Manifest, ResumeRefused, load
from schemas.job import JobSpec, parse_job
from schemas.wire import UnitResult
from workers.writer import TMP_PREFIX


def _spec(temperature: float) -> JobSpec:
    return parse_job(
        {
            "input": "x.jsonl",
            "teacher": {
                "model": "tiny",
                "endpoints": ["http://127.0.0.1:8000"],
                "authorization": {"owner": "o", "license": "l", "attestation": "a"},
            },
            "sampling": {"temperature": temperature},
        }
    )


# Named specs with different fingerprints (they differ in sampling).
SPECS = {"spec-1": _spec(1.0), "spec-2": _spec(0.5), "y": _spec(0.25)}


def open_(
    out: Path, spec_fp: str = "spec-1", input_fp: str = "input-1", force_new: bool = False
) -> Manifest:
    return Manifest.open(out, spec=SPECS[spec_fp], input_fp=input_fp, force_new=force_new)


def result(out: Path, unit_id: str = "a_jsonl-1234abcd-000000", failed: bool = True) -> UnitResult:
    return UnitResult(
        unit_id=unit_id,
        prompts=3,
        data_rows=5,
        failure_rows=1 if failed else 0,
        completion_tokens=42,
        data_path=str(out / "data" / f"{unit_id}.parquet"),
        data_sha256="d" * 64,
        failed_path=str(out / "failed" / f"{unit_id}.parquet") if failed else None,
        failed_sha256="f" * 64 if failed else None,
        endpoint_requests={"http://h:8000/v1": 4},
        retries=1,
        error_classes={"timeout": 1},
    )


def lines(out: Path) -> list[dict]:
    return [orjson.loads(x) for x in (out / MANIFEST).read_bytes().splitlines()]


def test_open_new_writes_header(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    m = open_(out)
    assert m.units == {}
    assert len(m.job_id) == 12
    [header] = lines(out)
    assert header == m.header
    assert header["kind"] == "job"
    assert header["job_id"] == m.job_id
    assert (header["spec_fingerprint"], header["input_fingerprint"], header["teacher"]) == (
        SPECS["spec-1"].fingerprint(),
        "input-1",
        "tiny",
    )
    assert JobSpec.model_validate(header["spec"]) == SPECS["spec-1"]  # retry-failed reads it
    assert isinstance(header["created"], float)


def test_new_jobs_get_distinct_ids(tmp_path: Path) -> None:
    assert open_(tmp_path / "a").job_id != open_(tmp_path / "b").job_id


def test_commit_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    m.commit(result(out, "b_jsonl-0000ffff-000000", failed=False))

    again = open_(out)
    assert again.job_id == m.job_id
    assert again.header == m.header
    assert set(again.units) == {"a_jsonl-1234abcd-000000", "b_jsonl-0000ffff-000000"}
    unit = again.units["a_jsonl-1234abcd-000000"]
    assert unit == {
        "kind": "unit",
        "unit_id": "a_jsonl-1234abcd-000000",
        "prompts": 3,
        "data_rows": 5,
        "failure_rows": 1,
        "completion_tokens": 42,
        "data_path": "data/a_jsonl-1234abcd-000000.parquet",  # stored relative to out
        "data_sha256": "d" * 64,
        "failed_path": "failed/a_jsonl-1234abcd-000000.parquet",
        "failed_sha256": "f" * 64,
        "endpoint_requests": {"http://h:8000/v1": 4},
        "retries": 1,
        "error_classes": {"timeout": 1},
        "node_id": "",
    }
    assert again.units == m.units
    assert again.units["b_jsonl-0000ffff-000000"]["failed_path"] is None
    assert again.shard_paths() == [
        out / "data" / "a_jsonl-1234abcd-000000.parquet",
        out / "data" / "b_jsonl-0000ffff-000000.parquet",
    ]
    assert again.shard_paths("failed") == [out / "failed" / "a_jsonl-1234abcd-000000.parquet"]
    assert len(lines(out)) == 3  # reopening does not write another header


def test_recommitted_unit_keeps_latest_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    m.commit(result(out, failed=False))
    assert load(out).units["a_jsonl-1234abcd-000000"]["failure_rows"] == 0


@pytest.mark.parametrize(
    ("change", "said", "not_said"),
    [
        ({"input_fp": "input-2"}, "the input files' content", "the teacher or sampling spec"),
        ({"spec_fp": "spec-2"}, "the teacher or sampling spec", "the input files' content"),
        ({"input_fp": "x", "spec_fp": "y"}, "the input files' content and the teacher", None),
    ],
)
def test_resume_refused_says_what_changed(
    tmp_path: Path, change: dict[str, str], said: str, not_said: str | None
) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    with pytest.raises(ResumeRefused) as exc:
        open_(out, **change)
    msg = str(exc.value)
    assert said in msg
    assert not_said is None or not_said not in msg
    assert m.job_id in msg
    assert "--force-new" in msg
    assert len(lines(out)) == 2  # nothing written


def test_force_new_discards_old_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = open_(out)
    old.commit(result(out))
    for sub in ("data", "failed"):
        (out / sub).mkdir()
        (out / sub / "a_jsonl-1234abcd-000000.parquet").write_bytes(b"old")
    (out / "keep.txt").write_text("user file")

    new = open_(out, input_fp="input-2", force_new=True)
    assert new.job_id != old.job_id
    assert new.units == {}
    assert not (out / "data").exists()
    assert not (out / "failed").exists()
    assert (out / "keep.txt").read_text() == "user file"
    [header] = lines(out)
    assert (header["job_id"], header["input_fingerprint"]) == (new.job_id, "input-2")


def test_force_new_on_empty_folder(tmp_path: Path) -> None:
    m = open_(tmp_path / "out", force_new=True)
    assert load(tmp_path / "out").job_id == m.job_id


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    with open(out / MANIFEST, "ab") as fh:
        fh.write(b'{"kind": "unit", "unit_id')
    again = open_(out)
    assert again.job_id == m.job_id
    assert list(again.units) == ["a_jsonl-1234abcd-000000"]
    assert list(load(out).units) == ["a_jsonl-1234abcd-000000"]


def test_commit_after_torn_line_survives(tmp_path: Path) -> None:
    out = tmp_path / "out"
    open_(out).commit(result(out))
    with open(out / MANIFEST, "ab") as fh:
        fh.write(b'{"kind": "unit", "unit_id')
    open_(out).commit(result(out, "b_jsonl-0000ffff-000000"))
    assert set(load(out).units) == {"a_jsonl-1234abcd-000000", "b_jsonl-0000ffff-000000"}


def test_temporaries_deleted_on_open(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    (out / "data").mkdir()
    (out / "failed").mkdir()
    tmps = [
        out / "data" / f"{TMP_PREFIX}a_jsonl-1234abcd-000001.parquet.0badf00d",
        out / "failed" / f"{TMP_PREFIX}a_jsonl-1234abcd-000001.parquet.12345678",
    ]
    keep = [
        out / "data" / "a_jsonl-1234abcd-000000.parquet",
        out / "data" / "a_jsonl-1234abcd-000001.parquet",  # uncommitted: overwritten on rerun
        out / "failed" / "a_jsonl-1234abcd-000000.parquet",
    ]
    for p in tmps + keep:
        p.write_bytes(b"x")

    open_(out)
    assert [p.exists() for p in tmps] == [False, False]
    assert [p.exists() for p in keep] == [True, True, True]


def test_temporaries_deleted_on_new_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    tmp = out / "data" / f"{TMP_PREFIX}x.parquet.abc"
    tmp.write_bytes(b"x")
    open_(out)
    assert not tmp.exists()


def test_load(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    loaded = load(out)
    assert (loaded.job_id, loaded.header, loaded.units) == (m.job_id, m.header, m.units)
    assert loaded.out_dir == out


def test_load_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no _manifest\.jsonl"):
        load(tmp_path)


def test_manifest_without_header_refused(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_bytes(b'{"kind": "unit", "unit_id": "u"}\nnot json\n')
    with pytest.raises(ResumeRefused, match="not a teacher-harvest manifest"):
        open_(tmp_path)
    with pytest.raises(ResumeRefused, match="not a teacher-harvest manifest"):
        load(tmp_path)


def test_relative_out_dir_with_absolute_worker_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    m = open_(Path("out"))
    m.commit(result(tmp_path.resolve() / "out"))  # workers report resolved paths
    unit = load(Path("out")).units["a_jsonl-1234abcd-000000"]
    assert unit["data_path"] == "data/a_jsonl-1234abcd-000000.parquet"
    assert m.shard_paths() == [Path("out/data/a_jsonl-1234abcd-000000.parquet")]
