"""One row of an on-policy round: the student samples, the teacher scores exactly those ids.

Each sample goes to the teacher as soon as the student's answer for its row arrives (within the
unit, while other rows are still with the student), as an ids row: ``prompt_token_ids`` (the
prompt as the student's server rendered it) + the sampled ``token_ids``, so nothing is
re-tokenised. The record holds the student's ids and logprobs (``student_logprobs``) and the
teacher's logprob and top-K of every sampled token, on the same positions. A row the student
cannot answer is ``n`` failure records; a sample the teacher cannot score is one failure
record (its sample index kept); neither is ever dropped.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from schemas.job import JobSpec
from schemas.wire import Completion, PromptRow, Sample, request_id
from workers.errors import FatalError, HarvestError, MissingLogprobs
from workers.shards.columns import compact
from workers.teacher.client import TeacherClient, sampling_for

Add = Callable[[PromptRow, "Completion | HarvestError"], Awaitable[None]]


@dataclass
class RoundClients:
    """The two clients of a round, each with its own endpoints, key, limits and retries."""

    student: TeacherClient
    teacher: TeacherClient


def scored_row(row: PromptRow, done: Completion, sample: Sample, rid: str) -> PromptRow:
    """The student's sample as the ids row the teacher scores."""
    return PromptRow(
        row.prompt_id, row.source, prompt=row.prompt, messages=row.messages,
        response=sample.response, prompt_token_ids=list(done.prompt_token_ids or []),
        token_ids=[int(t) for t in sample.token_ids],
        student_logprobs=[float(v) for v in sample.logprobs],
        request_id=rid, sample_index=sample.sample_index,
    )  # fmt: skip


async def round_row(
    row: PromptRow,
    clients: RoundClients,
    spec: JobSpec,
    add: Add,
    ready: Callable[[], Awaitable[None]],
    progress: Counter[str],
) -> None:
    """Sample ``row`` with the student, score every sample with the teacher, ``add`` each
    outcome (a failure as the error) to the unit's shards."""
    try:
        done = await clients.student.complete(row, ready)
    except FatalError:
        raise
    except HarvestError as err:
        progress["failed_prompts"] += 1
        progress["prompts"] += 1
        await add(row, err)
        return
    if done.prompt_token_ids is None or not done.prompt_token_ids:
        err = MissingLogprobs(
            "the student returned no prompt_token_ids (return_token_ids)",
            endpoint=done.endpoint, attempts=done.attempts,
        )  # fmt: skip
        progress["failed_prompts"] += 1
        progress["prompts"] += 1
        await add(row, err)
        return
    sampling = sampling_for(spec, row)
    teacher = spec.teacher.model

    async def score(sample: Sample) -> None:
        rid = request_id(row.prompt_id, sample.sample_index, teacher, sampling)
        ids_row = scored_row(row, done, sample, rid)
        outcome: Completion | HarvestError
        try:
            outcome = await clients.teacher.complete(ids_row, ready)
        except FatalError:
            raise
        except HarvestError as err:
            outcome = err
            progress["failed_samples"] += 1
        else:
            outcome.samples = [compact(s) for s in outcome.samples]  # flat memory until written
            for s in outcome.samples:
                s.finish_reason = sample.finish_reason  # the student's: why its sample ended
            progress["completion_tokens"] += sum(len(s.token_ids) for s in outcome.samples)
        await add(ids_row, outcome)

    async with asyncio.TaskGroup() as group:
        for sample in done.samples:
            group.create_task(score(sample))
    progress["prompts"] += 1
