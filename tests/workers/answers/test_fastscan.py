"""``read_completions`` (top-K read from the body's bytes) against ``parse_completions`` of
``orjson.loads`` (the reference): the same answer, bit for bit, or the same error, on real vLLM
bodies, synthetic top-20 ones, every number format JSON allows, and random byte edits."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from samples import same

from schemas.wire import Answer
from workers.answers import fastparse
from workers.answers.parse import parse_completions, read_completions
from workers.errors import InvalidResponse, MissingLogprobs

DATA = Path(__file__).resolve().parents[2] / "data" / "vllm"


@pytest.fixture(autouse=True)
def compiled() -> None:
    assert fastparse.compiled is not None, (
        "workers.answers._topk was not built (needs a C compiler)"
    )


def outcome(read: Any, raw: bytes, k: int) -> Answer | tuple[type, str]:
    try:
        return read(raw, k)
    except (InvalidResponse, MissingLogprobs) as err:
        return type(err), str(err)


def reference(raw: bytes, k: int) -> Answer:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidResponse(f"body is not JSON: {err}") from err
    return parse_completions(body, k)


def agree(raw: bytes, k: int) -> Answer | tuple[type, str]:
    """Both ways give the same answer (every field, arrays bit for bit) or the same error."""
    ours, ref = outcome(read_completions, raw, k), outcome(reference, raw, k)
    if isinstance(ref, Answer):
        assert isinstance(ours, Answer), (ours, raw[:200])
        assert ours.prompt_token_ids == ref.prompt_token_ids
        assert ours.prompt_tokens == ref.prompt_tokens
        assert len(ours.samples) == len(ref.samples)
        assert all(same(a, b) for a, b in zip(ours.samples, ref.samples, strict=True))
    else:
        assert ours == ref
    return ref


def synthetic(k: int = 20, n: int = 1, tokens: int = 64, seed: int = 1) -> bytes:
    from fake_teacher import FakeTeacher

    fake = FakeTeacher(model="m", vocab=32_000)
    req = {"model": "m", "prompt": "hi", "max_tokens": tokens, "logprobs": k, "n": n}
    return orjson.dumps(fake.answer(req | {"return_token_ids": True, "seed": seed}))


@pytest.mark.parametrize("name", [p.stem for p in sorted(DATA.glob("*.json"))])
def test_real_bodies_are_scanned_and_agree(name: str) -> None:
    raw = (DATA / f"{name}.json").read_bytes()
    k = int(name.rsplit("_k", 1)[1])  # what the server was asked for
    assert fastparse.scan(raw, k) is not None
    assert isinstance(agree(raw, k), Answer)
    for other in (k - 1, k + 1):  # an answer where the entries allow it, else the same error
        agree(raw, other)
    assert isinstance(agree(raw, k + 2), tuple)  # fewer alternatives than asked


@pytest.mark.parametrize(("k", "n"), [(20, 1), (20, 3), (1, 2), (50, 1)])
def test_synthetic_bodies_with_k_plus_1_entries_agree(k: int, n: int) -> None:
    raw = synthetic(k, n, tokens=128)
    assert fastparse.scan(raw, k) is not None
    assert isinstance(agree(raw, k), Answer)
    pretty = json.dumps(json.loads(raw), indent=2).encode()  # whitespace everywhere
    assert fastparse.scan(pretty, k) is not None
    assert isinstance(agree(pretty, k), Answer)


def _numbers() -> list[str]:
    """Every shape a logprob can take in JSON, and the cases the fast conversions must not
    round differently: 16-17 digit mantissas, float32 values, exact ties, long mantissas,
    leading zeros, exponents, zeros, extremes."""
    rng = random.Random(5)
    out = ["-0.0", "0.0", "-0.000", "0.5", "-9999.0", "-1e-05", "-1.5E+2", "-2.5e3", "-1e0",
           "-9007199254740993.0", "-9007199254740995.0", "-18014398509481985.0",
           "-0.1000000000000000055511151231257827", "-1.00000000000000011102230246251565404",
           "-0.00012345678901234567", "-123456789012345678.9", "-1e-300", "-4.9e-324",
           "-1.7976931348623157e308", "-0.30000000000000004", "-5e-324", "-2.2250738585072014e-308",
           "-12345678901234567890.5", "-0.000000000000000000001234"]  # fmt: skip
    for _ in range(3000):
        x = -rng.expovariate(0.3)
        f32 = struct.unpack("f", struct.pack("f", x))[0]
        out += [repr(x), repr(f32), f"{x:.17g}", f"{x:.20f}", f"{x:.9e}", f"{f32:.25g}"]
        out.append(f"{x:.3e}".replace("e-0", "e-"))
        digits = str(rng.randrange(2**53, 10**19))  # beyond a double's exact integers
        point = rng.randrange(1, len(digits))
        out.append(f"-{digits[:point]}.{digits[point:]}")
    return [s if any(c in s for c in ".eE") else s + ".0" for s in out]


def _body(numbers: list[str], k: int) -> bytes:
    """One choice whose tokens each have k alternatives valued by ``numbers`` (raw JSON)."""
    rows = [numbers[i : i + k] for i in range(0, len(numbers) - k + 1, k)]
    tops = ",".join(
        "{" + ",".join(f'"token_id:{j + 1}":{v}' for j, v in enumerate(row)) + "}" for row in rows
    )
    choice = {
        "index": 0, "text": "", "finish_reason": "length", "prompt_token_ids": [1, 2],
        "token_ids": [7] * len(rows),
        "logprobs": {"tokens": ["token_id:7"] * len(rows), "token_logprobs": [-0.5] * len(rows),
                     "top_logprobs": "TOPS"},
    }  # fmt: skip
    body = {"choices": [choice], "usage": {"prompt_tokens": 2}}
    return orjson.dumps(body).replace(b'"TOPS"', b"[" + tops.encode() + b"]")


def test_every_number_shape_reads_to_the_same_double() -> None:
    numbers = _numbers()
    raw = _body(numbers, 4)
    scanned = fastparse.scan(raw, 4)
    assert scanned is not None  # not one of them made the scan give up
    ref = orjson.loads(raw)["choices"][0]["logprobs"]["top_logprobs"]
    want = np.array([sorted(e.values(), reverse=True) for e in ref], np.float64)
    got = scanned.tops[0][1]
    assert got.tobytes() == want.tobytes()  # bit for bit: -0.0 and every last digit
    assert isinstance(agree(raw, 4), Answer)


@pytest.mark.parametrize(
    "number", ["-1", "0", "-01.5", "-1.", "-.5", "-1e", "-1e+", "1e400", "-1e999999", "NaN",
               "-Infinity", "+1.0", "- 1.0", "-1.5.0", "-0x1p3", "true", "null", '"-1.0"'],
)  # fmt: skip
def test_odd_numbers_fall_back_and_agree(number: str) -> None:
    raw = _body(["-0.5", number, "-2.5"], 3)
    agree(raw, 3)
    assert fastparse.scan(raw, 3) is None  # left to orjson and the checked path


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"token_id:2":', b'"token_id:1":'),  # a repeated key: the dict keeps one
        (b'"token_id:2":', b'"token_\\u0069d:2":'),  # an escaped key
        (b'"token_id:2":', b'"token_id:0002":'),  # leading zeros: the same id, kept apart
        (b'"token_id:2":', b'"token_id:' + b"9" * 19 + b'":'),  # too long
        (b'"token_id:2":', b'"tok":'),
        (b'"text":""', b'"text":"\\u0000"'),  # could forge a marker
        (b'"text":""', b'"text":"\\"top_logprobs\\":[{}]"'),  # the key's name inside a string
        (b'"top_logprobs":[', b'"top_logprobs":null,"x":['),
        (b'"usage":{', b'"usage":{"top_logprobs":[1,2],'),  # the name elsewhere, odd value
        (b'"usage":{', b'"usage":{"top_logprobs":[{"token_id:1":-1.0}],'),  # read, unused
        (b'"top_logprobs"', b'"top_logprobs":[],"top_logprobs"'),  # the last one counts
    ],
)
def test_edits_that_only_the_full_parse_can_judge_agree(old: bytes, new: bytes) -> None:
    raw = _body(["-0.5", "-1.5", "-2.5"] * 5, 3)
    assert old in raw
    agree(raw.replace(old, new, 1), 3)


def test_random_byte_edits_never_disagree() -> None:
    """Seeded random byte edits (flips, deletions, insertions of JSON's own characters) of a
    top-20 body, mostly inside top_logprobs: answer or error, both ways are the same."""
    base = synthetic(20, 2, tokens=8, seed=3)
    start = base.index(b"top_logprobs")
    rng = random.Random(17)
    kinds: dict[str, int] = {"answer": 0, "error": 0}
    for _ in range(1500):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(start, len(raw)) if rng.random() < 0.8 else rng.randrange(len(raw))
            what = rng.random()
            char = rng.choice(b'0123456789.-+eE"{}[],: \\nx')
            if what < 0.4:
                raw[at] = char
            elif what < 0.7:
                del raw[at]
            else:
                raw.insert(at, char)
        got = agree(bytes(raw), 20)
        kinds["answer" if isinstance(got, Answer) else "error"] += 1
    assert kinds["answer"] > 100 and kinds["error"] > 100  # both outcomes were exercised
