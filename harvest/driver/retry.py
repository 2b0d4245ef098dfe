"""``harvest retry-failed``: re-send the prompts of an output's failure shards.

Rows that failed as ``InvalidInput`` (the input reader refused them, or the teacher cannot
score them as given) can never succeed on a retry: they are not sent again, but carried into
the unit's new failure shard as they were (every prompt stays in exactly one place) and
counted in the summary as not retried.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from harvest.driver.options import RunOptions
from harvest.driver.scheduler import Work, _open_store, _units_per_shard, drive
from harvest.driver.summary import Summary
from harvest.inputs.sources import iter_units, scan
from harvest.outputs.manifest import RETRY_SEP, Manifest
from harvest.outputs.manifest import load as load_manifest
from schemas.job import JobSpec
from schemas.wire import PromptRow, RowProblem, WorkUnit
from workers.storage import Store
from workers.teacher.client import sampling_for

NOT_RETRIED = frozenset({"InvalidInput"})


@dataclass(frozen=True, slots=True)
class Failed:
    """One failure record of a unit's failure shard."""

    sample_index: int
    request_id: str
    error_class: str
    message: str


def failed_records(store: Store, rel: str) -> dict[str, list[Failed]]:
    """prompt id -> its failure records, of one failure shard."""
    cols = ["prompt_id", "sample_index", "request_id", "error_class", "message"]
    with store.open_input_file(rel) as fh:
        t = pq.read_table(fh, columns=cols)
    out: dict[str, list[Failed]] = {}
    for pid, index, rid, cls, msg in zip(*(t[c].to_pylist() for c in cols), strict=True):
        out.setdefault(pid, []).append(Failed(index, rid, cls, msg or ""))
    return out


def retry_rows(
    spec: JobSpec, rows: list[PromptRow | RowProblem], failed: dict[str, list[Failed]]
) -> tuple[list[PromptRow | RowProblem], Counter[str]]:
    """The unit's failed rows for a retry, and the records kept as they were, by class.

    A row is sent again when its failure may now succeed: a plain row when it failed; a row
    that carries ids (one source sample) when that sample failed; a round's row only when all
    its ``n`` samples failed (the student samples them anew, and a sample already committed
    must not get a second record). What is not sent stays a failure record (a problem row,
    which writes it again without a request), so every prompt stays in exactly one place."""
    out: list[PromptRow | RowProblem] = []
    kept: Counter[str] = Counter()
    for row in rows:
        records = failed.get(row.prompt_id, [])
        ids_row = row.request_id is not None or (
            isinstance(row, PromptRow) and row.token_ids is not None
        )
        if ids_row:
            records = [r for r in records if r.sample_index == row.sample_index]
        if not records:
            continue
        hopeless = all(r.error_class in NOT_RETRIED for r in records)
        partial_round = (
            spec.mode == "round"
            and isinstance(row, PromptRow)
            and len(records) < sampling_for(spec, row)["n"]
        )
        if isinstance(row, PromptRow) and not hopeless and not partial_round:
            out.append(row)
            continue
        for r in records if (ids_row or partial_round) else records[:1]:
            kept[r.error_class] += 1
            if isinstance(row, RowProblem) and not (ids_row or partial_round):
                out.append(row)
            elif ids_row or partial_round:  # one record, under its own key
                out.append(RowProblem(row.prompt_id, row.source, r.message, None,
                                      r.sample_index, r.request_id))  # fmt: skip
            else:
                out.append(RowProblem(row.prompt_id, row.source, r.message))
    return out, kept


def _failed_kinds(store: Store, rel: str) -> tuple[int, set[str]]:
    """How many prompts one failure shard holds that a retry sends, and their kinds (chat /
    completions)."""
    with store.open_input_file(rel) as fh:
        t = pq.read_table(fh, columns=["prompt_id", "prompt", "messages", "error_class"])
    kinds: set[str] = set()
    ids: set[str] = set()
    for pid, prompt, messages, cls in zip(*(t[c].to_pylist() for c in t.column_names), strict=True):
        ids.add(pid)
        if cls not in NOT_RETRIED:
            kinds.add("chat" if messages is not None else "completions" if prompt else "")
    kinds.discard("")
    return len(ids), kinds


def retry_failed(out: str | Path, *, options: RunOptions | None = None) -> Summary:
    """Re-send the prompts of ``out``'s failure shards; recovered rows join the data."""
    store = _open_store(str(out))
    spec = JobSpec.model_validate(load_manifest(store).header.spec)
    inputs = scan(spec)

    def open_manifest() -> Manifest:
        return Manifest.open(store, spec=spec, input_fp=inputs.fingerprint)

    def plan(manifest: Manifest, summary: Summary) -> Work | None:
        # One unit's failed ids at a time: no per-prompt state for the whole output.
        failed = {uid: u.failed_path for uid, u in manifest.units.items() if u.failed_path}
        if not failed:
            return None  # nothing to send: no input read again, nothing swept
        total, kinds = 0, set()
        for rel in failed.values():
            count, found = _failed_kinds(store, rel)
            total, kinds = total + count, kinds | found

        def retry_units() -> Iterator[WorkUnit]:
            for u in iter_units(inputs.files, spec, _units_per_shard(spec)):
                if u.unit_id in failed:
                    rows, kept = retry_rows(spec, u.rows, failed_records(store, failed[u.unit_id]))
                    summary.not_retried.update(kept)
                    yield WorkUnit(f"{u.unit_id}{RETRY_SEP}{manifest.retries(u.unit_id) + 1}", rows)

        return Work(retry_units(), manifest.commit_retry, frozenset(kinds), total)

    return drive(store, spec, inputs.rows, open_manifest, plan, options or RunOptions())
