"""The torch IterableDataset: DataLoader workers x data-parallel ranks read disjoint parts."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_output import random_output

torch = pytest.importorskip("torch")

from harvest import HarvestIterableDataset  # noqa: E402


def loader_ids(out: Path, rank: int, world_size: int, workers: int, **kw) -> list[str]:
    data = HarvestIterableDataset(
        out, 4, 32, rank=rank, world_size=world_size, meta_columns=["request_id"], **kw
    )
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
    got = []
    for batch in loader:
        assert batch["input_ids"].dtype == torch.int64 and batch["top_ids"].dtype == torch.int32
        assert batch["input_ids"].shape[0] == len(batch["request_id"])
        assert batch["input_ids"].shape[1] <= 32  # padded to the batch's longest row
        got += batch["request_id"]
    return got


def test_two_workers_times_two_ranks_cover_every_row_once(tmp_path: Path) -> None:
    every = random_output(tmp_path, [6, 2, 5, 3, 7])  # 5 shards over 4 parts
    per_rank = [loader_ids(tmp_path, rank, 2, workers=2) for rank in range(2)]
    flat = per_rank[0] + per_rank[1]
    assert sorted(flat) == sorted(every)
    assert len(set(flat)) == len(flat) == 23
    assert all(per_rank)


def test_set_epoch_reshuffles(tmp_path: Path) -> None:
    random_output(tmp_path, [6] * 5)
    data = HarvestIterableDataset(
        tmp_path, 4, 32, shuffle=True, shuffle_buffer=8, meta_columns=["request_id"]
    )
    first = [x for b in data for x in b["request_id"]]
    assert first == [x for b in data for x in b["request_id"]]
    data.set_epoch(1)
    second = [x for b in data for x in b["request_id"]]
    assert sorted(first) == sorted(second) and first != second
