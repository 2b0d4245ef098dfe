"""Preflight: the logprob mode told from crafted answers; endpoints must agree on the template."""

from __future__ import annotations

import math

import pytest
from fault_teacher_server import FaultTeacherServer
from test_fault_teacher_server import make_spec

from harvest.driver.preflight import (
    LOGPROB_MODES,
    PreflightError,
    check_teacher,
    classify_logprob_mode,
)

# The first token's top-5 log-probabilities at temperature 1 for some prompt.
RAW = [-0.6, -1.8, -2.5, -3.0, -3.5]  # probability mass 0.88


def softmax_at(logits: list[float], t: float) -> list[float]:
    """Log-softmax of logits / t over the given logits plus a long flat tail."""
    scaled = [x / t for x in logits] + [-8.0 / t] * 1000
    z = math.log(sum(math.exp(v) for v in scaled))
    return [v - z for v in scaled[: len(logits)]]


LOGITS = [9.1, 7.9, 7.2, 6.5, 6.0]


@pytest.mark.parametrize(
    ("tops", "mode"),
    [
        ({1.0: RAW, 0.5: list(RAW)}, "raw_logprobs"),
        ({1.0: RAW, 0.5: [v + 3e-5 for v in RAW]}, "raw_logprobs"),  # float noise of a batch
        ({1.0: softmax_at(LOGITS, 1.0), 0.5: softmax_at(LOGITS, 0.5)}, "processed_logprobs"),
        ({1.0: LOGITS, 0.5: list(LOGITS)}, "raw_logits"),
        ({1.0: LOGITS, 0.5: [v / 0.5 for v in LOGITS]}, "processed_logits"),
        # Negative logits: the top-K probability mass gives them away (> 1).
        ({1.0: [-0.1, -0.2, -0.3], 0.5: [-0.1, -0.2, -0.3]}, "raw_logits"),
    ],
    ids=["raw", "raw-noise", "processed", "raw-logits", "processed-logits", "negative-logits"],
)
def test_classify_logprob_mode(tops, mode) -> None:
    got, how = classify_logprob_mode(tops)
    assert got == mode and mode in LOGPROB_MODES
    assert ("identical" in how) == mode.startswith("raw")


def test_without_alternatives_the_mode_is_unknown() -> None:
    assert classify_logprob_mode({1.0: [], 0.5: []})[0] == "unknown"  # a job at logprobs: 0
    assert classify_logprob_mode({1.0: RAW})[0] == "unknown"  # the second probe failed


def test_endpoints_must_serve_one_chat_template() -> None:
    with FaultTeacherServer() as a, FaultTeacherServer() as b:
        spec = make_spec(a.url, endpoints=[a.url, b.url])
        same = check_teacher(spec, None, "job", [a.url, b.url])
        assert same.chat_template_hash and same.tokenizer_hash
        plain = b.fake.tokenize

        def other_template(body):  # same tokenizer, another chat template
            answer = plain(body)
            if "messages" in body:
                answer["tokens"] = [7, *answer["tokens"]]
            return answer

        b.fake.tokenize = other_template
        with pytest.raises(PreflightError, match="different chat templates"):
            check_teacher(spec, None, "job", [a.url, b.url])
        b.fake.tokenize = lambda body: {**plain(body), "tokens": [9, *plain(body)["tokens"]]}
        with pytest.raises(PreflightError, match="different tokenizers"):
            check_teacher(spec, None, "job", [a.url, b.url])
