"""A seeded, bounded random-edit fuzz of the real vLLM bodies (tests/data/vllm/): byte flips,
deletions, insertions of JSON's own characters and cuts at any point, each edited body handed
over as exactly its own bytes. Both parsers must give the same answer or the same error.

``make sanitize`` runs this (and the other parser tests) against the compiled core built with
AddressSanitizer and UndefinedBehaviorSanitizer, where a read past a body's end or an undefined
operation aborts the run; ``HARVEST_FUZZ_EDITS`` sets the edits per body there."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from test_fastscan import agree

from schemas.wire import Answer

DATA = Path(__file__).resolve().parents[2] / "data" / "vllm"
EDITS = int(os.environ.get("HARVEST_FUZZ_EDITS", "600"))
CHARS = b'0123456789.-+eE"{}[],: \\nxtu_'


def edited(rng: random.Random, base: bytes, start: int) -> bytes:
    raw = bytearray(base)
    if rng.random() < 0.15:  # a body cut short, anywhere (most often inside the top-K)
        cut = rng.randrange(start, len(raw)) if rng.random() < 0.8 else rng.randrange(len(raw))
        return bytes(raw[:cut])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(start, len(raw)) if rng.random() < 0.8 else rng.randrange(len(raw))
        what = rng.random()
        if what < 0.4:
            raw[at] = rng.choice(CHARS)
        elif what < 0.6:
            del raw[at]
        elif what < 0.9:
            raw.insert(at, rng.choice(CHARS))
        else:  # a run of digits: long numbers, long ids
            raw[at:at] = bytes(rng.choice(b"0123456789") for _ in range(rng.randint(8, 40)))
    return bytes(raw)


@pytest.mark.parametrize("name", [p.stem for p in sorted(DATA.glob("*.json"))])
def test_random_edits_of_real_bodies_never_disagree(name: str) -> None:
    base = (DATA / f"{name}.json").read_bytes()
    k = int(name.rsplit("_k", 1)[1])
    start = base.index(b"top_logprobs")
    rng = random.Random(f"{name}:23")
    kinds = {"answer": 0, "error": 0}
    for _ in range(EDITS):
        got = agree(edited(rng, base, start), k)
        kinds["answer" if isinstance(got, Answer) else "error"] += 1
    assert kinds["error"] > EDITS // 10  # the edits reached the parser's error paths
    assert kinds["answer"] > EDITS // 20  # and left answers that both parse alike
