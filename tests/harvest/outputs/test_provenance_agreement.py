"""Shards of one output must agree on their provenance, the mode included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_output import random_record, write_output

from harvest.outputs import manifest
from harvest.outputs.manifest import ResumeRefused
from harvest.outputs.provenance import check_logprob_mode, disagreements

META = {"job_id": "j", "schema_version": "2", "teacher": {"model": "tiny"}, "sampling": {}}


def test_shards_from_before_the_mode_existed_agree_with_generate_shards() -> None:
    old, new = "out/data/part-a.parquet", "out/data/part-b.parquet"
    assert disagreements([(old, META), (new, {**META, "mode": "generate"})]) == []


def test_a_score_shard_among_generate_shards_is_named() -> None:
    old, new = "out/data/part-a.parquet", "out/data/part-b.parquet"
    assert disagreements([(old, META), (new, {**META, "mode": "score"})]) == [
        "part-b.parquet: mode differs from part-a.parquet"
    ]


@pytest.mark.parametrize(
    ("held", "now", "refused"),
    [
        ("raw_logprobs", "raw_logprobs", False),
        ("raw_logprobs", "processed_logprobs", True),
        ("processed_logprobs", "raw_logits", True),
        ("raw_logprobs", "unknown", False),  # the probe could not tell: no conflict
        ("unknown", "processed_logprobs", False),
        (None, "raw_logprobs", False),  # shards from before the mode was stamped
    ],
)
def test_resume_refuses_shards_of_another_logprob_mode(
    tmp_path: Path, held: str | None, now: str, refused: bool
) -> None:
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    extra = {"logprob_mode": held} if held else {}
    write_output(out, [[random_record("a", rng)], [random_record("b", rng)]], extra_meta=extra)
    output = manifest.load(str(out))
    if refused:
        with pytest.raises(ResumeRefused, match=f"logprob mode {held}.*now returns {now}"):
            check_logprob_mode(output, now)
    else:
        check_logprob_mode(output, now)


def test_an_output_without_shards_takes_any_mode(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(out, [])
    check_logprob_mode(manifest.load(str(out)), "processed_logprobs")
