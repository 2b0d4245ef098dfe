"""The driver: CLI, scheduler, prompt sources, manifest/resume, and readers for training.

``open_dataset`` and ``iter_batches`` read committed shards for distillation, ``iter_joined``
several teachers' scored outputs of the same records;
``HarvestIterableDataset`` (torch, loaded on first use) wraps them for a DataLoader.
"""

from __future__ import annotations

from typing import Any

from harvest.training.batches import iter_batches, open_dataset
from harvest.training.join import iter_joined

__all__ = ["HarvestIterableDataset", "iter_batches", "iter_joined", "open_dataset"]


def __getattr__(name: str) -> Any:
    if name == "HarvestIterableDataset":  # torch is an optional extra: import it only on use
        from harvest.training.torch_data import HarvestIterableDataset

        return HarvestIterableDataset
    raise AttributeError(f"module 'harvest' has no attribute {name!r}")
