"""Which rows ``harvest retry-failed`` sends again, read from a unit's failure shard.

A plain row is retried when any of its records failed. A row that carries ids (score mode on
another harvest's records) is one sample: it is retried when that sample failed, never
because another sample of the same prompt did. A round's row is sampled anew by the student,
all ``n`` samples at once, so it is retried only when every sample failed: a sample already
committed must not get a second record (its failed siblings stay failure records).
"""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq

from schemas.job import JobSpec
from schemas.wire import PromptRow, RowProblem
from workers.storage import Store
from workers.teacher.client import sampling_for


def failed_samples(store: Store, rel: str) -> Counter[tuple[str, int | None]]:
    """Failure records per (prompt id, sample index), and per (prompt id, None)."""
    with store.open_input_file(rel) as fh:
        t = pq.read_table(fh, columns=["prompt_id", "sample_index"])
    pairs = list(zip(t["prompt_id"].to_pylist(), t["sample_index"].to_pylist(), strict=True))
    return Counter(pairs) + Counter((pid, None) for pid, _ in pairs)


def to_retry(spec: JobSpec, row: PromptRow | RowProblem, failed: Counter) -> bool:
    """Whether ``row`` is sent again: an ids row if its own sample failed; a round's row
    only if all its samples failed (the student samples them anew, and a sample already
    committed must not get a second record); any other row if it failed."""
    if (isinstance(row, PromptRow) and row.token_ids is not None) or row.request_id is not None:
        return failed[(row.prompt_id, row.sample_index)] > 0
    if spec.mode == "round" and isinstance(row, PromptRow):
        return failed[(row.prompt_id, None)] >= sampling_for(spec, row)["n"]
    return failed[(row.prompt_id, None)] > 0
