"""harvest inspect: counts, provenance, histograms and decoded samples of a synthetic output."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from synthetic_output import failure, record, teacher, write_output

from harvest.cli import main
from harvest.training.inspection import report

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny-llama"


def rec(rid: str, prompt: list[int], tokens: list[int], lp: float) -> dict:
    """Top-2 holding 0.5 + 0.25 of the mass at every token; every sampled logprob ``lp``."""
    n = len(tokens)
    top_lps = [[math.log(0.5), math.log(0.25)]] * n
    return record(rid, prompt, tokens, [[t, t + 1] for t in tokens], top_lps, [lp] * n)


def build(out: Path, model_root: str) -> None:
    shards = [
        [rec("a", [5, 6], [7, 8, 9], -0.5), rec("b", [5], [7], -0.5)],
        [rec("c", [5, 6, 7], [1, 2, 3, 4, 5, 6], -3.0)],
    ]
    fails = [[failure("d", "BadRequest"), failure("e", "BadRequest")], [failure("f", "Timeout")]]
    ident = teacher(model_root=model_root)
    write_output(out, shards, k=2, identities=[ident, ident], failures=fails)


def test_counts_provenance_and_histograms(tmp_path: Path) -> None:
    build(tmp_path, "/nowhere/tiny")
    text = report(tmp_path)
    assert "prompts:   6   samples: 3   shards: 2 data, 2 failed" in text
    assert "tokens:    10 response, 6 prompt" in text
    assert "failures:  3 records\n  BadRequest: 2\n  Timeout: 1" in text
    assert "teacher:   tiny (loaded from /nowhere/tiny; tokenizer tok-a)" in text
    assert "max_tokens=16" in text and "logprobs=3" in text
    assert "teacher top-2 mass per token: mean 0.7500 (tail 0.2500)" in text
    lengths = text.split("response length (tokens):\n")[1].split("\n\n")[0].splitlines()
    assert [int(line.split()[-1]) for line in lengths if line.strip()] == [1, 0, 1, 0, 0, 1]
    assert lengths[0].split("|")[0].strip() == "1" and lengths[-1].split("|")[0].strip() == "6"
    prompt_lengths = text.split("prompt length (tokens):\n")[1].split("\n\n")[0].splitlines()
    assert [int(line.split()[-1]) for line in prompt_lengths] == [1, 1, 1]  # 1, 2 and 3 tokens
    lp = text.split("sampled-token logprob:\n")[1].split("\n\n")[0].splitlines()
    counts = {line.split("|")[0].strip(): int(line.split()[-1]) for line in lp}
    assert sum(counts.values()) == 10
    assert counts[next(k for k in counts if k.startswith("[-3.00"))] == 6
    assert counts[next(k for k in counts if k.endswith("-0.45)"))] == 4
    # No tokenizer at /nowhere: the stored text is shown.
    assert "prompt (text):   prompt of a" in text and "response (text): response of a" in text


def test_samples_are_decoded_with_the_teachers_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    prompt, response = tok("Once upon").input_ids, tok(" a time there was").input_ids
    n = len(response)
    rows = [[record("x", prompt, response, [[1, 2]] * n, [[-1.0, -2.0]] * n, [-1.0] * n)]]
    write_output(tmp_path, rows, k=2, identities=[teacher(model_root=str(TINY))])
    text = report(tmp_path, samples=1)
    decoded = re.search(r"response \(decoded\): (.*)", text)
    assert decoded and decoded.group(1) == tok.decode(response)
    assert "prompt (decoded):   " + tok.decode(prompt) in text
    assert "response (text): response of x" in report(tmp_path, samples=1, decode=False)


def test_cli_inspect(tmp_path: Path, capsys) -> None:
    build(tmp_path, "/nowhere/tiny")
    assert main(["inspect", str(tmp_path), "--samples", "1", "--no-decode"]) == 0
    out = capsys.readouterr().out
    assert "prompts:   6" in out and out.count("prompt (text)") == 1
    assert main(["inspect", str(tmp_path / "missing")]) == 2
