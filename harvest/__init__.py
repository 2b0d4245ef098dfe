"""The driver: CLI, scheduler, prompt sources, manifest/resume, and readers for training.

``open_dataset`` and ``iter_batches`` read committed shards for distillation;
``HarvestIterableDataset`` (torch, loaded on first use) wraps them for a DataLoader.
"""

from __future__ import annotations

from typing import Any

from harvest.training.batches import iter_batches, open_dataset

__all__ = ["HarvestIterableDataset", "iter_batches", "open_dataset"]


def __getattr__(name: str) -> Any:
    if name == "HarvestIterableDataset":  # torch is an optional extra: import it only on use
        from harvest.training.torch_data import HarvestIterableDataset

        return HarvestIterableDataset
    raise AttributeError(f"module 'harvest' has no attribute {name!r}")
