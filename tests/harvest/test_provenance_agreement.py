"""Shards of one output must agree on their provenance, the mode included."""

from __future__ import annotations

from harvest.provenance import disagreements

META = {"job_id": "j", "schema_version": "2", "teacher": {"model": "tiny"}, "sampling": {}}


def test_shards_from_before_the_mode_existed_agree_with_generate_shards() -> None:
    old, new = "out/data/part-a.parquet", "out/data/part-b.parquet"
    assert disagreements([(old, META), (new, {**META, "mode": "generate"})]) == []


def test_a_score_shard_among_generate_shards_is_named() -> None:
    old, new = "out/data/part-a.parquet", "out/data/part-b.parquet"
    assert disagreements([(old, META), (new, {**META, "mode": "score"})]) == [
        "part-b.parquet: mode differs from part-a.parquet"
    ]
