"""A torch IterableDataset over a harvest's committed shards (needs the ``train`` extra).

Each DataLoader worker of each data-parallel rank reads its own disjoint part: part
``rank * num_workers + worker_id`` of ``world_size * num_workers``, so no row is seen twice and
none is skipped in an epoch. Use it with ``DataLoader(ds, batch_size=None, num_workers=...)``:
the dataset yields whole batches already.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "harvest.training.torch_data needs torch: pip install 'teacher-harvest[train]'"
    ) from err

from harvest.training.batches import Batches, OutDirs, iter_batches


class HarvestIterableDataset(IterableDataset):
    """Batches of ``harvest.iter_batches`` as torch tensors, split across ranks and workers.

    ``rank`` / ``world_size`` default to torch.distributed's when it is initialised. Call
    ``set_epoch(e)`` before each epoch to reshuffle (the seed becomes ``seed + e``). Keyword
    arguments go to ``iter_batches`` (``pack``, ``shuffle_buffer``, ``pad_id``, ``filter``...).
    """

    def __init__(
        self,
        out: OutDirs,
        batch_size: int,
        max_len: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = (
            world_size
            if world_size is not None
            else (torch.distributed.get_world_size() if dist else 1)
        )
        self.out, self.batch_size, self.max_len = out, batch_size, max_len
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.options = options
        self.epoch = 0
        self.batches: Batches | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        batches = iter_batches(
            self.out,
            self.batch_size,
            self.max_len,
            rank=self.rank * workers + worker,
            world_size=self.world_size * workers,
            shuffle=self.shuffle,
            seed=self.seed + self.epoch,
            drop_last=self.drop_last,
            **self.options,
        )
        self.batches = batches  # its truncated_targets / truncated_rows count this pass
        for batch in batches:
            yield {name: _tensor(v) for name, v in batch.items()}

    @property
    def truncated_targets(self) -> int:
        """Trained target tokens ``max_len`` cut in the current (or last) pass, in this process
        (with DataLoader workers each worker counts its own and warns about it)."""
        return self.batches.truncated_targets if self.batches is not None else 0


def _tensor(value: Any) -> Any:
    """Arrays as tensors; a list of arrays (packed ``cu_seqlens``) as a list of tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return [torch.from_numpy(v) for v in value]
    return value
