"""Comparing parsed samples: their top-K fields are numpy arrays, so ``==`` cannot say."""

from __future__ import annotations

import numpy as np

from schemas.wire import Sample


def same(a: Sample, b: Sample) -> bool:
    """Field by field; the top-K arrays by dtype, shape and every value (bit for bit)."""
    for name in Sample.__slots__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True
