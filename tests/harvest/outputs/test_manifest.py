"""The commit protocol on a local folder (the same code path as object stores): new jobs,
create-once commits, resume checks, retries, torn writes and orphans."""

from __future__ import annotations

import os
from pathlib import Path

import jobs
import pytest
from pydantic import ValidationError

from harvest.outputs.manifest import (
    COMMITS,
    HEADER,
    JobHeader,
    Manifest,
    ResumeRefused,
    RetryCommit,
    UnitCommit,
    load,
    parse_record,
)
from schemas.job import JobSpec
from schemas.wire import UnitResult
from workers.storage import open_store
from workers.storage.local import _temporary

U1, U2 = "a_jsonl-1234abcd-000000", "b_jsonl-0000ffff-000000"


def _spec(temperature: float) -> JobSpec:
    return jobs.spec(jobs.model("tiny"), sampling={"temperature": temperature})


# Named specs with different fingerprints (they differ in sampling).
SPECS = {"spec-1": _spec(1.0), "spec-2": _spec(0.5), "y": _spec(0.25)}


def open_(
    out: Path, spec_fp: str = "spec-1", input_fp: str = "input-1", force_new: bool = False
) -> Manifest:
    return Manifest.open(
        open_store(str(out)), spec=SPECS[spec_fp], input_fp=input_fp, force_new=force_new
    )


def shard(out: Path, rel: str, body: bytes = b"parquet bytes") -> str:
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(body)
    return rel


def result(
    out: Path, unit_id: str = U1, failed: bool = True, attempt: str = "a1", rows: int = 5
) -> UnitResult:
    """What a worker reports after writing (really, here) its attempt's shards."""
    return UnitResult(
        unit_id=unit_id,
        prompts=3,
        data_rows=rows,
        failure_rows=1 if failed else 0,
        completion_tokens=42,
        data_path=shard(out, f"data/part-{unit_id}-{attempt}.parquet"),
        data_sha256="d" * 64,
        failed_path=shard(out, f"failed/part-{unit_id}-{attempt}.parquet") if failed else None,
        failed_sha256="f" * 64 if failed else None,
        endpoint_requests={"http://h:8000/v1": 4},
        retries=1,
        error_classes={"timeout": 1},
    )


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_open_new_writes_header(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    m = open_(out)
    assert m.units == {}
    assert len(m.job_id) == 12
    header = parse_record((out / HEADER).read_bytes())
    assert isinstance(header, JobHeader) and header == m.header
    assert (header.spec_fingerprint, header.input_fingerprint, header.teacher) == (
        SPECS["spec-1"].fingerprint(),
        "input-1",
        "tiny",
    )
    assert JobSpec.model_validate(header.spec) == SPECS["spec-1"]  # retry-failed reads it
    assert files(out) == [HEADER]


def test_new_jobs_get_distinct_ids(tmp_path: Path) -> None:
    assert open_(tmp_path / "a").job_id != open_(tmp_path / "b").job_id


def test_commit_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    first = m.commit(result(out))
    m.commit(result(out, U2, failed=False))

    again = open_(out)
    assert again.job_id == m.job_id and again.header == m.header
    assert set(again.units) == {U1, U2}
    unit = again.units[U1].base
    assert unit == first
    assert unit.model_dump() == {
        "kind": "unit",
        "job_id": m.job_id,
        "unit_id": U1,
        "prompts": 3,
        "data_rows": 5,
        "failure_rows": 1,
        "completion_tokens": 42,
        "data_path": f"data/part-{U1}-a1.parquet",  # relative to the output root
        "data_sha256": "d" * 64,
        "failed_path": f"failed/part-{U1}-a1.parquet",
        "failed_sha256": "f" * 64,
        "endpoint_requests": {"http://h:8000/v1": 4},
        "retries": 1,
        "error_classes": {"timeout": 1},
        "node_id": "",
    }
    assert again.units[U2].failed_path is None
    assert again.shard_paths() == [f"data/part-{U1}-a1.parquet", f"data/part-{U2}-a1.parquet"]
    assert again.shard_paths("failed") == [f"failed/part-{U1}-a1.parquet"]
    assert sorted(p.name for p in (out / COMMITS).iterdir()) == [f"{U1}.json", f"{U2}.json"]


def test_a_unit_is_committed_once_and_a_duplicate_attempt_is_deleted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    kept = m.commit(result(out, attempt="first"))
    assert m.commit(result(out, failed=False, attempt="second")) is None
    assert load(open_store(str(out))).units[U1].base == kept
    assert not (out / f"data/part-{U1}-second.parquet").exists()
    assert (out / f"data/part-{U1}-first.parquet").exists()


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
    before = {p: (out / p).read_bytes() for p in files(out)}
    with pytest.raises(ResumeRefused) as exc:
        open_(out, **change)
    msg = str(exc.value)
    assert said in msg
    assert not_said is None or not_said not in msg
    assert m.job_id in msg and "--force-new" in msg
    assert {p: (out / p).read_bytes() for p in files(out)} == before  # nothing written


def test_force_new_discards_old_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = open_(out)
    old.commit(result(out))
    (out / "keep.txt").write_text("user file")

    new = open_(out, input_fp="input-2", force_new=True)
    assert new.job_id != old.job_id and new.units == {}
    assert files(out) == [HEADER, "keep.txt"]
    assert load(open_store(str(out))).header.input_fingerprint == "input-2"


def test_a_commit_of_another_job_is_never_read_and_is_deleted(tmp_path: Path) -> None:
    """E.g. a --force-new reset killed after the new header: the old commits name a dead job."""
    out = tmp_path / "out"
    m = open_(out)
    foreign = UnitCommit.of("0ld0ld0ld0ld", result(out, attempt="old"))
    (out / COMMITS).mkdir(parents=True)
    (out / COMMITS / f"{U1}.json").write_bytes(foreign.dumps())
    assert load(open_store(str(out))).units == {}
    assert open_(out).job_id == m.job_id
    assert files(out) == [HEADER]


def test_torn_and_orphan_objects_are_never_read_and_are_swept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    planted = [
        shard(out, f"data/part-{U2}-crashed.parquet", b"PAR1 torn"),  # a killed writer's shard
        shard(out, f"failed/part-{U2}-crashed.parquet"),
        shard(out, f"{COMMITS}/{U2}.json", b'{"kind": "unit", "unit_id'),  # not a whole record
        shard(out, "_harvest/commits/.tmp-0badf00d"),
    ]
    loaded = load(open_store(str(out)))
    assert list(loaded.units) == [U1]
    assert loaded.shard_paths() == [f"data/part-{U1}-a1.parquet"]
    assert all((out / p).exists() for p in planted)  # readers delete nothing

    again = open_(out)
    assert list(again.units) == [U1]
    assert not any((out / p).exists() for p in planted)
    again.commit(result(out, U2, attempt="rerun"))  # the unit reruns under a new name
    assert load(open_store(str(out))).shard_paths() == [
        f"data/part-{U1}-a1.parquet",
        f"data/part-{U2}-rerun.parquet",
    ]


def test_the_sweep_deletes_a_dead_writers_temporary_and_keeps_a_live_one(tmp_path: Path) -> None:
    """A temporary beside the lease may be this driver's heartbeat mid-write: only one that no
    write of this process holds is a leftover, however fresh."""
    out = tmp_path / "out"
    m = open_(out)
    dead = out / shard(out, "_harvest/.tmp-deadwriter")  # a killed driver's, seconds old
    with _temporary(str(out / "_harvest" / "lease.json")) as live:
        Path(live).write_bytes(b"a heartbeat under way")
        m.sweep()
        assert not dead.exists() and Path(live).exists()
    m.sweep()
    assert not Path(live).exists()  # once its write is over (here: abandoned), it is swept


def test_retries_join_the_data_and_replace_the_failure_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    m.commit(result(out))
    assert m.retries(U1) == 0
    first = m.commit_retry(result(out, f"{U1}.retry1", attempt="r1", rows=1))
    assert isinstance(first, RetryCommit) and (first.of_unit, first.attempt) == (U1, 1)
    assert not (out / f"failed/part-{U1}-a1.parquet").exists()  # superseded, deleted
    second = m.commit_retry(result(out, f"{U1}.retry2", failed=False, attempt="r2", rows=1))
    assert second is not None and not (out / f"failed/part-{U1}.retry1-r1.parquet").exists()

    state = open_(out).units[U1]
    assert state.data_paths == [
        f"data/part-{U1}-a1.parquet",
        f"data/part-{U1}.retry1-r1.parquet",
        f"data/part-{U1}.retry2-r2.parquet",
    ]
    assert state.failed_path is None and state.failure_rows == 0
    assert (state.data_rows, state.completion_tokens) == (7, 3 * 42)
    assert load(open_store(str(out))).shard_paths("failed") == []


def test_teacher_identity_is_recorded_once_and_checked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    open_(out).check_teacher({"model": "tiny", "tokenizer_hash": "aa"})
    again = open_(out)
    again.check_teacher({"model": "tiny", "tokenizer_hash": "aa"})
    with pytest.raises(ResumeRefused, match=r"different teacher \(tokenizer_hash changed\)"):
        again.check_teacher({"model": "tiny", "tokenizer_hash": "bb"})


def test_records_are_read_one_way(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = open_(out)
    unit = UnitCommit.of(m.job_id, result(out))
    retry = RetryCommit.of(m.job_id, result(out, f"{U1}.retry1"), of_unit=U1, attempt=1)
    for record in (m.header, unit, retry):
        assert parse_record(record.dumps()) == record
        assert type(parse_record(record.dumps())) is type(record)
    with pytest.raises(ValidationError):
        parse_record(b'{"kind": "unit", "unit_id": "u"}')  # fields missing
    with pytest.raises(ValidationError):
        parse_record(b'{"kind": "something-else"}')


def test_load_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no _harvest/job\.json"):
        load(open_store(str(tmp_path)))


def test_garbage_header_refused(tmp_path: Path) -> None:
    shard(tmp_path, HEADER, b'{"kind": "unit", "unit_id": "u"}')
    with pytest.raises(ResumeRefused, match="not a teacher-harvest job header"):
        open_(tmp_path)
    with pytest.raises(ResumeRefused, match="not a teacher-harvest job header"):
        load(open_store(str(tmp_path)))


def test_relative_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = open_(Path("out"))
    m.commit(result(tmp_path / "out"))
    loaded = load("out")
    assert loaded.store.child_uri(loaded.shard_paths()[0]) == os.path.join(
        tmp_path, "out", f"data/part-{U1}-a1.parquet"
    )
