"""Duplicate ids found in bounded memory: the same first duplicates a dict of every id finds."""

from __future__ import annotations

import random

import pytest

from harvest.inputs import dupes
from harvest.inputs.dupes import DuplicateFinder


def oracle(rows: list[tuple[str, int, str]], limit: int = 5) -> list[tuple[str, str, str]]:
    """What the old scan reported: the first repeats in input order, each with the first row."""
    seen: dict[str, tuple[int, str]] = {}
    out = []
    for pid, f, where in rows:
        first = seen.setdefault(pid, (f, where))
        if first != (f, where) and len(out) < limit:
            out.append((pid, first, (f, where)))
    return out


def found(rows: list[tuple[str, int, str]], **kw) -> list[tuple[str, str, str]]:
    finder = DuplicateFinder(**kw)
    for pid, f, where in rows:
        finder.add(pid, f, where)
    return [(d.prompt_id, d.first, d.again) for d in finder.find()]


def random_rows(n: int, distinct: int, seed: int) -> list[tuple[str, int, str]]:
    rng = random.Random(seed)
    return [(f"id-{rng.randrange(distinct)}", i % 3, f":{i + 1}") for i in range(n)]


@pytest.mark.parametrize("budget", [dupes.BUDGET, 2_000, 100])  # 100: files split to the end
def test_the_first_duplicates_in_input_order(budget: int) -> None:
    rows = random_rows(5_000, 4_800, seed=budget)
    assert len(oracle(rows)) == 5
    assert found(rows, budget=budget) == oracle(rows)


def test_no_duplicates_and_ids_that_share_a_partition() -> None:
    """Ids in the same partition file (the hash only picks the file) are told apart."""
    ids = [f"p{i}" for i in range(2_000)]
    by_part: dict[int, list[str]] = {}
    for pid in ids:
        by_part.setdefault(dupes._bits(pid.encode(), 0), []).append(pid)
    assert max(len(v) for v in by_part.values()) > 1
    assert found([(pid, 0, f":{i}") for i, pid in enumerate(ids)], budget=100) == []


def test_every_id_in_one_partition_at_every_depth(monkeypatch) -> None:
    """A hash that sends everything to one file: splitting stops at MAX_DEPTH, still exact."""
    monkeypatch.setattr(dupes, "_bits", lambda key, depth: 7)
    rows = random_rows(3_000, 2_990, seed=1)
    assert found(rows, budget=100) == oracle(rows)


def test_long_and_non_ascii_ids_round_trip() -> None:
    long_id = "x" * (1 << 20)  # larger than a read block
    rows = [("é\ud800", 0, ":1"), (long_id, 0, ":2"), ("é\ud800", 1, "#0"), (long_id, 2, "#9")]
    assert found(rows) == [("é\ud800", (0, ":1"), (1, "#0")), (long_id, (0, ":2"), (2, "#9"))]


def test_memory_holds_write_buffers_not_ids(tmp_path) -> None:
    finder = DuplicateFinder()
    for i in range(200_000):
        finder.add(f"prompt-{i:09d}", 0, f":{i + 1}")
    held = sum(len(b) for b in finder._buffers)
    assert held < dupes.PARTITIONS * (dupes.FLUSH + 64)  # ~7 MB of records went to disk
    assert finder.find() == []
