"""inspect's finish reasons, length buckets, score-mode views and the failures view
(issue 22, points 5, 6 and 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_output import failure, record, teacher, write_output

from harvest.cli import main
from harvest.training.inspection import report

TINY = Path(__file__).resolve().parents[2] / "data" / "tiny-llama"


def rec(rid: str, n: int, finish: str) -> dict:
    r = record(rid, [5, 6], list(range(3, 3 + n)), [[1, 2]] * n, [[-1.0, -2.0]] * n, [-1.0] * n)
    return {**r, "finish_reason": finish}


def test_finish_reasons_are_counted(tmp_path: Path) -> None:
    write_output(
        tmp_path, [[rec("a", 16, "length"), rec("b", 2, "stop"), rec("c", 16, "length")]], k=2
    )
    text = report(tmp_path)
    block = text.split("finish reasons:\n")[1].split("\n\n")[0]
    assert "length: 2 (66.7%)" in block and "stop: 1 (33.3%)" in block


def test_length_buckets_never_pass_max_tokens(tmp_path: Path) -> None:
    # SPEC's max_tokens is 16; lengths 2..16 in 8 bars of 2 used to end with a "16-17" bar.
    write_output(tmp_path, [[rec("a", 2, "stop"), rec("b", 16, "length")]], k=2)
    lengths = report(tmp_path).split("response length (tokens):\n")[1].split("\n\n")[0]
    labels = [line.split("|")[0].strip() for line in lengths.splitlines()]
    highs = [int(label.split("-")[-1]) for label in labels]
    assert max(highs) == 16, labels


def score_rec(rid: str) -> dict:
    # score mode: the first token alone is the "prompt"; the loss mask says what was scored
    r = record(rid, [5], [6, 7, 8, 9, 10], [[1, 2]] * 5, [[-1.0, -2.0]] * 5, [-1.0] * 5,
               loss_mask=[False, False, True, True, True])  # fmt: skip
    return {**r, "prompt": "given prompt", "response": "given response"}


def test_score_mode_uses_the_loss_mask(tmp_path: Path) -> None:
    write_output(tmp_path, [[score_rec("a"), score_rec("b")]], k=2, extra_meta={"mode": "score"})
    text = report(tmp_path, samples=1, decode=False)
    assert "tokens:    6 scored (trained on), 6 context" in text
    assert "temperature" not in text and "score mode" in text
    prompt_lengths = text.split("context length (tokens):\n")[1].split("\n\n")[0]
    assert [line.split("|")[0].strip() for line in prompt_lengths.splitlines()] == ["3"]
    scored = text.split("scored length (tokens):\n")[1].split("\n\n")[0]
    assert [line.split("|")[0].strip() for line in scored.splitlines()] == ["3"]


def test_score_mode_samples_split_at_the_mask(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    ids = tok("Once upon a time there was").input_ids
    n = len(ids) - 1
    mask = [False, False] + [True] * (n - 2)
    row = {**record("x", ids[:1], ids[1:], [[1, 2]] * n, [[-1.0, -2.0]] * n, [-1.0] * n,
                    loss_mask=mask)}  # fmt: skip
    write_output(tmp_path, [[row]], k=2, identities=[teacher(model_root=str(TINY))],
                 extra_meta={"mode": "score"})  # fmt: skip
    text = report(tmp_path, samples=1)
    assert "prompt (decoded):   " + tok.decode(ids[:3]) in text
    assert "scored (decoded):   " + tok.decode(ids[3:]) in text


def test_failures_view_gives_classes_messages_sources_and_examples(tmp_path: Path, capsys) -> None:
    fails = [
        {**failure("d", "InvalidInput"), "message": "malformed JSON", "source": "in.jsonl:4",
         "raw": "{oops"},
        {**failure("e", "InvalidInput"), "message": "malformed JSON", "source": "in.jsonl:9"},
        {**failure("f", "Timeout"), "message": "read timeout after 60 s", "source": "in.jsonl:2"},
    ]  # fmt: skip
    write_output(tmp_path, [[rec("a", 2, "stop")]], k=2, failures=[fails])
    assert main(["failures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "InvalidInput: 2 prompts" in out and "Timeout: 1 prompt" in out
    assert "malformed JSON (2)" in out and "read timeout after 60 s (1)" in out
    assert "in.jsonl:4" in out and "in.jsonl:9" in out and "{oops" in out
    assert main(["failures", str(tmp_path), "--examples", "1"]) == 0
    examples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    [")]
    assert len(examples) == 2  # one per class
