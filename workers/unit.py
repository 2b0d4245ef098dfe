"""Harvest one work unit: send its rows, then write its data shard and failure shard.

Plain async Python (the Ray actor is a thin shell around it). Every row of the unit ends up in
exactly one of the two shards, once per expected sample: a row that cannot be sent or whose
request failed for good becomes ``n`` failure records, never a silent gap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

from schemas.job import JobSpec
from schemas.wire import Completion, PromptRow, RowProblem, UnitResult, WorkUnit, request_id
from workers.client import TeacherClient, sampling_for
from workers.errors import FatalError, HarvestError, MissingLogprobs
from workers.storage import Store
from workers.writer import compact, data_columns, failure_columns, write_shard

Outcome = Completion | HarvestError | RowProblem


def shard_paths(unit_id: str, attempt: str) -> tuple[str, str]:
    """Where one attempt at a unit writes (relative to the output root): names no other
    attempt uses, so a late or duplicate attempt never overwrites a committed shard."""
    return f"data/part-{unit_id}-{attempt}.parquet", f"failed/part-{unit_id}-{attempt}.parquet"


async def _send_all(
    rows: list[PromptRow | RowProblem], client: TeacherClient, progress: Counter[str]
) -> list[Outcome]:
    outcomes: list[Outcome] = [r for r in rows]  # RowProblems stay as they are

    async def one(i: int, row: PromptRow) -> None:
        try:
            done = await client.complete(row)
        except FatalError:
            raise
        except HarvestError as err:
            outcomes[i] = err
            progress["failed_prompts"] += 1
        else:
            done.samples = [compact(s) for s in done.samples]  # flat memory until the write
            outcomes[i] = done
            progress["completion_tokens"] += sum(len(s.token_ids) for s in done.samples)
        progress["prompts"] += 1

    try:
        async with asyncio.TaskGroup() as group:
            for i, row in enumerate(rows):
                if isinstance(row, PromptRow):
                    group.create_task(one(i, row))
    except ExceptionGroup as eg:  # a fatal error cancels the unit; surface the first one
        raise eg.exceptions[0] from None
    progress["failed_prompts"] += sum(isinstance(r, RowProblem) for r in rows)
    progress["prompts"] += sum(isinstance(r, RowProblem) for r in rows)
    return outcomes


async def harvest_unit(
    unit: WorkUnit,
    client: TeacherClient,
    spec: JobSpec,
    store: Store,
    shard_meta: dict[str, Any],
    progress: Counter[str] | None = None,
) -> UnitResult:
    """Run every row of ``unit`` through ``client`` and write its shards (the driver commits)."""
    progress = progress if progress is not None else Counter()
    outcomes = await _send_all(unit.rows, client, progress)
    teacher = spec.teacher.model
    data = data_columns(spec.sampling.logprobs, spec.output.logprob_dtype)
    fails = failure_columns()
    endpoints: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    tokens = retries = 0
    for row, outcome in zip(unit.rows, outcomes, strict=True):
        if isinstance(row, RowProblem):
            sampling = sampling_for(spec, PromptRow(row.prompt_id, row.source))
            errors["InvalidInput"] += 1
            for s in range(sampling["n"]):
                fails.append(
                    request_id=request_id(row.prompt_id, s, teacher, sampling),
                    prompt_id=row.prompt_id, sample_index=s, source=row.source, raw=row.raw,
                    error_class="InvalidInput", message=row.reason, attempts=0, teacher=teacher,
                )  # fmt: skip
            continue
        sampling = sampling_for(spec, row)
        if isinstance(outcome, Completion) and outcome.prompt_token_ids is None:
            outcome = _without_prompt_ids(outcome)
        if isinstance(outcome, HarvestError):
            errors[type(outcome).__name__] += 1
            retries += outcome.attempts - 1
            for s in range(sampling["n"]):
                fails.append(
                    request_id=request_id(row.prompt_id, s, teacher, sampling),
                    prompt_id=row.prompt_id, sample_index=s, source=row.source,
                    prompt=row.prompt, messages=row.messages,
                    error_class=type(outcome).__name__, http_status=outcome.http_status,
                    message=str(outcome), attempts=outcome.attempts,
                    endpoint=outcome.endpoint or None, teacher=teacher,
                )  # fmt: skip
            continue
        assert isinstance(outcome, Completion)
        endpoints[outcome.endpoint] += 1
        retries += outcome.attempts - 1
        for sample in outcome.samples:
            tokens += len(sample.token_ids)
            data.append(
                request_id=request_id(row.prompt_id, sample.sample_index, teacher, sampling),
                prompt_id=row.prompt_id, sample_index=sample.sample_index, api=row.api,
                prompt=row.prompt, messages=row.messages, response=sample.response,
                finish_reason=sample.finish_reason, prompt_tokens=outcome.prompt_tokens,
                completion_tokens=len(sample.token_ids),
                prompt_token_ids=outcome.prompt_token_ids, token_ids=sample.token_ids,
                logprobs=sample.logprobs, top_token_ids=sample.top_token_ids,
                top_logprobs=sample.top_logprobs, loss_mask=sample.loss_mask,
                teacher=teacher, endpoint=outcome.endpoint,
                attempts=outcome.attempts, latency_ms=outcome.latency_ms,
            )  # fmt: skip

    data_path, failed_path = shard_paths(unit.unit_id, uuid.uuid4().hex[:10])
    meta = {**shard_meta, "unit_id": unit.unit_id}
    compression = spec.output.compression
    data_sha = write_shard(data.table(), store, data_path, {**meta, "kind": "data"}, compression)
    failed_sha = None
    if len(fails):
        failed_sha = write_shard(
            fails.table(), store, failed_path, {**meta, "kind": "failed"}, compression
        )
    return UnitResult(
        unit_id=unit.unit_id,
        prompts=len(unit.rows),
        data_rows=len(data),
        failure_rows=len(fails),
        completion_tokens=tokens,
        data_path=data_path,
        data_sha256=data_sha,
        failed_path=failed_path if failed_sha else None,
        failed_sha256=failed_sha,
        endpoint_requests=dict(endpoints),
        retries=retries,
        error_classes=dict(errors),
    )


def _without_prompt_ids(done: Completion) -> MissingLogprobs:
    """A record must carry the ids the teacher saw; an answer without them is a failure row."""
    err = MissingLogprobs(
        "teacher returned no prompt_token_ids (return_token_ids)", endpoint=done.endpoint
    )
    err.attempts = done.attempts
    return err
