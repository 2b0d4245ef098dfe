"""The run summary: this run's figures and the output's, each labelled (issue 22, points 1-4)."""

from __future__ import annotations

import json

from harvest.cli import format_summary
from harvest.driver.summary import Summary
from harvest.outputs.manifest import UnitCommit, UnitState


def _commit(unit: str, prompts: int, failed: int, tokens: int) -> UnitCommit:
    return UnitCommit(
        job_id="j", unit_id=unit, prompts=prompts, data_rows=prompts - failed,
        failure_rows=failed, completion_tokens=tokens, data_path=f"data/{unit}.parquet",
        data_sha256=None, failed_path=f"failed/{unit}.parquet" if failed else None,
        failed_sha256=None, endpoint_requests={"http://a/v1": prompts - failed}, retries=0,
        error_classes={"TeacherError": failed} if failed else {},
    )  # fmt: skip


def _summary(earlier: list[UnitCommit], now: list[UnitCommit], elapsed: float) -> Summary:
    s = Summary("/out", "j", prompts=sum(c.prompts for c in earlier + now))
    s.resume([UnitState(c) for c in earlier])
    for c in now:
        s.add(c)
    s.prompts_this_run = sum(c.prompts for c in now)
    s.settle([UnitState(c) for c in earlier + now])
    s.elapsed_s = elapsed
    return s


def test_noop_rerun_claims_no_throughput() -> None:
    s = _summary([_commit("u0", 6, 0, 502)], [], elapsed=10.0)
    text = format_summary(s)
    assert "502" in text  # the output's tokens, labelled as such
    assert "0 tok/s" in text and "50 tok/s" not in text
    d = s.to_dict()
    assert d["this_run"]["tokens"] == 0 and d["this_run"]["tokens_per_s"] == 0
    assert d["output"]["tokens"] == 502 and d["output"]["data_rows"] == 6
    assert "elapsed_s" in d["this_run"] and "elapsed_s" not in d["output"]


def test_resume_rate_counts_only_this_runs_tokens() -> None:
    s = _summary([_commit("u0", 4, 0, 49)], [_commit("u1", 4, 0, 128)], elapsed=1.0)
    d = s.to_dict()
    assert d["this_run"]["tokens_per_s"] == 128.0
    assert d["this_run"]["data_rows"] == 4 and d["output"]["data_rows"] == 8
    assert "128 tok/s" in format_summary(s)


def test_failed_prompts_are_not_called_harvested() -> None:
    s = _summary([], [_commit("u0", 6, 4, 20)], elapsed=1.0)
    text = format_summary(s)
    assert "6 harvested" not in text
    assert "2 harvested, 4 failed" in text
    assert s.to_dict()["this_run"]["failed_prompts"] == 4


def test_summary_never_points_at_a_parquet_glob() -> None:
    text = format_summary(_summary([], [_commit("u0", 2, 0, 3)], elapsed=1.0))
    assert "*.parquet" not in text
    assert "harvest.open_dataset" in text or "harvest inspect" in text


def test_summary_json_is_plain_json() -> None:
    s = _summary([_commit("u0", 2, 1, 3)], [_commit("u1", 2, 0, 3)], elapsed=2.0)
    assert json.loads(json.dumps(s.to_dict()))["output"]["failure_rows"] == 1
