"""Harvest one work unit: send its rows, writing its data and failure shards as answers arrive.

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
from schemas.records import FAILURE_SCHEMA, record_schema
from schemas.wire import Completion, PromptRow, RowProblem, UnitResult, WorkUnit, request_id
from workers.answers.tail import tail_logprob
from workers.errors import FatalError, HarvestError, MissingLogprobs
from workers.round import RoundClients, round_row
from workers.shards.columns import compact
from workers.shards.writer import ShardWriter
from workers.storage import Store
from workers.teacher.client import TeacherClient, request_for, sampling_for
from workers.teacher.limiter import worker_share
from workers.teacher.score import given

Outcome = Completion | HarvestError | RowProblem


def shard_paths(unit_id: str, attempt: str) -> tuple[str, str]:
    """Where one attempt at a unit writes (relative to the output root): names no other
    attempt uses, so a late or duplicate attempt never overwrites a committed shard."""
    return f"data/part-{unit_id}-{attempt}.parquet", f"failed/part-{unit_id}-{attempt}.parquet"


class _Unit:
    """One attempt's two shards and tallies; rows go to a shard as their answers arrive, so
    a row group is the most a unit holds (rows land in the order their answers came)."""

    def __init__(self, unit: WorkUnit, spec: JobSpec, store: Store, meta: dict[str, Any]) -> None:
        self.spec, self.teacher = spec, spec.teacher.model
        self.data_path, self.failed_path = shard_paths(unit.unit_id, uuid.uuid4().hex[:10])
        meta = {**meta, "unit_id": unit.unit_id}
        compression = spec.output.compression
        self.data = ShardWriter(
            store, self.data_path, record_schema(spec.sampling.logprobs,
            spec.output.logprob_dtype, spec.output.topk_encoding), {**meta, "kind": "data"},
            compression,
        )  # fmt: skip
        self.fails = ShardWriter(
            store, self.failed_path, FAILURE_SCHEMA, {**meta, "kind": "failed"}, compression
        )
        self.endpoints: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.tokens = self.retries = 0

    async def add(
        self, row: PromptRow | RowProblem, outcome: Outcome, sampling: dict[str, Any] | None = None
    ) -> None:
        """Append ``row``'s records to their shard; write a row group when one is due.
        ``sampling`` is the row's request's (``request_for``), computed once per row."""
        self._records(row, outcome, sampling)
        for shard in (self.data, self.fails):
            if shard.due:
                await shard.flush()

    async def room(self) -> None:
        """Before a request: wait while the shards' buffers are full (``ShardWriter.room``)."""
        await self.data.room()
        await self.fails.room()

    def _records(
        self, row: PromptRow | RowProblem, outcome: Outcome, sampling: dict[str, Any] | None
    ) -> None:
        teacher, fails = self.teacher, self.fails
        if isinstance(row, RowProblem):
            sampling = sampling_for(self.spec, PromptRow(row.prompt_id, row.source))
            self.errors["InvalidInput"] += 1
            for s in _indices(row, sampling["n"]):
                fails.append(
                    request_id=_rid(row, s, teacher, sampling),
                    prompt_id=row.prompt_id, sample_index=s, source=row.source, raw=row.raw,
                    error_class="InvalidInput", message=row.reason, attempts=0, teacher=teacher,
                )  # fmt: skip
            return
        sampling = sampling if sampling is not None else sampling_for(self.spec, row)
        if isinstance(outcome, Completion) and outcome.prompt_token_ids is None:
            outcome = _without_prompt_ids(outcome)
        if isinstance(outcome, HarvestError):
            self.errors[type(outcome).__name__] += 1
            self.retries += outcome.attempts - 1
            for s in _indices(row, sampling["n"]):
                fails.append(
                    request_id=_rid(row, s, teacher, sampling),
                    prompt_id=row.prompt_id, sample_index=s, source=row.source,
                    prompt=row.prompt, messages=row.messages,
                    error_class=type(outcome).__name__, http_status=outcome.http_status,
                    message=str(outcome), attempts=outcome.attempts,
                    endpoint=outcome.endpoint or None, teacher=teacher,
                )  # fmt: skip
            return
        assert isinstance(outcome, Completion)
        self.endpoints[outcome.endpoint] += 1
        self.retries += outcome.attempts - 1
        for sample in outcome.samples:
            self.tokens += len(sample.token_ids)
            self.data.append(
                request_id=_rid(row, sample.sample_index, teacher, sampling),
                prompt_id=row.prompt_id, sample_index=sample.sample_index, api=row.api,
                prompt=row.prompt, messages=row.messages, response=sample.response,
                finish_reason=sample.finish_reason, prompt_tokens=outcome.prompt_tokens,
                completion_tokens=len(sample.token_ids),
                prompt_token_ids=outcome.prompt_token_ids, token_ids=sample.token_ids,
                logprobs=sample.logprobs, top_token_ids=sample.top_token_ids,
                top_logprobs=sample.top_logprobs, loss_mask=sample.loss_mask,
                tail_logprob=tail_logprob(sample.top_logprobs),
                teacher=teacher, endpoint=outcome.endpoint,
                attempts=outcome.attempts, latency_ms=outcome.latency_ms,
                student_logprobs=row.student_logprobs,
            )  # fmt: skip

    def abort(self) -> None:
        self.data.abort()
        self.fails.abort()


async def _send_all(
    rows: list[PromptRow | RowProblem],
    client: TeacherClient | RoundClients,
    out: _Unit,
    progress: Counter[str],
) -> None:
    async def settle(row: PromptRow, outcome: Completion | HarvestError, sampling: Any) -> None:
        if isinstance(outcome, HarvestError):
            progress["failed_prompts"] += 1
        else:
            outcome.samples = [compact(s) for s in outcome.samples]  # flat until the write
            progress["completion_tokens"] += sum(len(s.token_ids) for s in outcome.samples)
        progress["prompts"] += 1
        await out.add(row, outcome, sampling)

    async def one(row: PromptRow) -> None:
        if isinstance(client, RoundClients):  # the student samples, the teacher scores
            await round_row(row, client, out.spec, out.add, out.room, progress)
            return
        outcome: Completion | HarvestError
        request = request_for(out.spec, row)
        try:
            outcome = await client.complete(row, out.room, request=request)
        except FatalError:
            raise
        except HarvestError as err:
            outcome = err
        await settle(row, outcome, request.sampling)

    async def batch(group: list[PromptRow]) -> None:
        assert isinstance(client, TeacherClient)
        requests = [request_for(out.spec, row) for row in group]
        outcomes = await client.score_batch(group, requests, out.room)
        for row, request, outcome in zip(group, requests, outcomes, strict=True):
            await settle(row, outcome, request.sampling)

    for row in rows:  # rows that cannot be sent are failure rows from the start
        if isinstance(row, RowProblem):
            await out.add(row, row)
            progress["failed_prompts"] += 1
            progress["prompts"] += 1
    singles, batches = _batches(rows, client, out.spec)
    try:
        async with asyncio.TaskGroup() as group:
            for group_rows in batches:
                group.create_task(batch(group_rows))
            for row in singles:
                group.create_task(one(row))
    except ExceptionGroup as eg:  # a fatal error cancels the unit; surface the first one
        raise eg.exceptions[0] from None


def _batches(
    rows: list[PromptRow | RowProblem], client: TeacherClient | RoundClients, spec: JobSpec
) -> tuple[list[PromptRow], list[list[PromptRow]]]:
    """The rows sent alone, and the score mode's ids rows in groups of up to
    ``concurrency.score_rows_per_request`` that share one request (the same temperature, the
    only sampling a score row may override). With ``tokens_per_min`` set, a group also stays
    within this worker's share of it: the limiter lets a request above the limit go once its
    window is empty, which a batch must not turn into a burst past the limit."""
    size = spec.concurrency.score_rows_per_request
    sendable = [row for row in rows if isinstance(row, PromptRow)]
    if spec.mode != "score" or size < 2 or isinstance(client, RoundClients):
        return sendable, []
    budget = worker_share(spec.teacher.rate_limit, spec.concurrency.workers).tokens_per_min
    singles: list[PromptRow] = []
    groups: list[list[PromptRow]] = []
    open_groups: dict[Any, tuple[list[PromptRow], int]] = {}  # temperature -> (rows, tokens)
    for row in sendable:
        if not given(row):
            singles.append(row)
            continue
        key = row.overrides.get("temperature")
        assert row.prompt_token_ids is not None and row.token_ids is not None
        cost = len(row.prompt_token_ids) + len(row.token_ids) - 1  # what the row reserves
        group, tokens = open_groups.get(key, ([], 0))
        if group and budget is not None and tokens + cost > budget:
            groups.append(group)
            group, tokens = [], 0
        group.append(row)
        open_groups[key] = (group, tokens + cost)
        if len(group) == size:
            groups.append(group)
            del open_groups[key]
    groups += [group for group, _ in open_groups.values()]
    singles += [group[0] for group in groups if len(group) == 1]
    return singles, [group for group in groups if len(group) > 1]


async def harvest_unit(
    unit: WorkUnit,
    client: TeacherClient | RoundClients,
    spec: JobSpec,
    store: Store,
    shard_meta: dict[str, Any],
    progress: Counter[str] | None = None,
    node_id: str = "",
) -> UnitResult:
    """Run every row of ``unit`` through ``client`` and write its shards (the driver commits)."""
    progress = progress if progress is not None else Counter()
    out = _Unit(unit, spec, store, shard_meta)
    try:
        await _send_all(unit.rows, client, out, progress)
        data_sha = await out.data.close(empty=True)
        failed_sha = await out.fails.close()
    except BaseException:  # a fatal error, a cancelled unit: no shard appears
        out.abort()
        raise
    return UnitResult(
        unit_id=unit.unit_id,
        prompts=len(unit.rows),
        data_rows=out.data.rows,
        failure_rows=out.fails.rows,
        completion_tokens=out.tokens,
        data_path=out.data_path,
        data_sha256=data_sha,
        failed_path=out.failed_path if failed_sha else None,
        failed_sha256=failed_sha,
        endpoint_requests=dict(out.endpoints),
        retries=out.retries,
        error_classes=dict(out.errors),
        node_id=node_id,
    )


def _indices(row: PromptRow | RowProblem, n: int) -> range:
    """The sample indices a row's records take: its source's one sample for an ids row."""
    ids_row = row.request_id is not None or getattr(row, "token_ids", None) is not None
    if ids_row or row.sample_index:
        return range(row.sample_index, row.sample_index + 1)
    return range(n)


def _rid(row: PromptRow | RowProblem, s: int, teacher: str, sampling: dict[str, Any]) -> str:
    """A record's key: an ids row keeps its source record's, so outputs of several teachers
    scoring the same records join on it."""
    return row.request_id or request_id(row.prompt_id, s, teacher, sampling)


def _without_prompt_ids(done: Completion) -> MissingLogprobs:
    """A record must carry the ids the teacher saw; an answer without them is a failure row."""
    return MissingLogprobs(
        "teacher returned no prompt_token_ids (return_token_ids)",
        endpoint=done.endpoint,
        attempts=done.attempts,
    )
