"""Padding-token fraction (padded to the longest row vs packed) and the float16 tail-mass error
(tail recomputed from float16 top-K vs the worker's stored float32 tail), on a harvest output.

Usage: python bench/packing_tail.py OUT [--batch-size 8] [--max-len 256]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.compute as pc

import harvest
from harvest.training.targets import tail_logprob


def padding_fraction(out: str, batch_size: int, max_len: int, pack: bool) -> float:
    pad = total = 0
    for b in harvest.iter_batches(out, batch_size, max_len, pack=pack):
        m = b["attention_mask"]
        pad, total = pad + int((m == 0).sum()), total + m.size
    return pad / total


def float16_tail_error(out: str) -> dict[str, float]:
    """Largest |mass error| of the tail recomputed from float16-rounded top-K logprobs, against
    the stored tail (the worker's, from the server's full-precision values)."""
    table = harvest.open_dataset(out).to_table(columns=["top_logprobs", "tail_logprob"])
    k = table.schema.field("top_logprobs").type.value_type.list_size
    flat = pc.list_flatten(pc.list_flatten(table.column("top_logprobs"))).to_numpy()
    tops = flat.astype(np.float64).reshape(-1, k)
    stored = pc.list_flatten(table.column("tail_logprob")).to_numpy().astype(np.float64)
    from16 = tail_logprob(tops.astype(np.float16)).astype(np.float64)
    from32 = tail_logprob(tops).astype(np.float64)
    return {
        "positions": len(stored),
        # what a float16 harvest would lose without the stored tail
        "max_tail_mass_error_float16": float(np.abs(np.exp(from16) - np.exp(stored)).max()),
        # the stored tail against the one recomputed from the float32 top-K beside it
        "max_tail_mass_error_stored_vs_float32": float(
            np.abs(np.exp(from32) - np.exp(stored)).max()
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    a = ap.parse_args()
    print(
        json.dumps(
            {
                "padding_fraction_longest": padding_fraction(a.out, a.batch_size, a.max_len, False),
                "padding_fraction_packed": padding_fraction(a.out, a.batch_size, a.max_len, True),
                **float16_tail_error(a.out),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
