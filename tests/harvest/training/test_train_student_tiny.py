"""examples/train_student.py on a tiny input: it says why the held-out KL can get worse, and
saves the student with its tokenizer (issue 22, point 10)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic_output import random_record, teacher, write_output

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "tests" / "data" / "tiny-llama"


def load_example():
    spec = importlib.util.spec_from_file_location(
        "train_student", ROOT / "examples" / "train_student.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_input_warns_and_the_saved_student_has_its_tokenizer(tmp_path, capsys) -> None:
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    rows = [random_record(f"p{i}", rng) for i in range(30)]
    write_output(tmp_path / "out", [rows], identities=[teacher(model_root=str(TINY))])
    example = load_example()
    saved = tmp_path / "student"
    assert example.main([str(tmp_path / "out"), "--steps", "2", "--max-len", "32",
                         "--save", str(saved)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "note: the held-out KL measures generalisation" in out and "training prompts" in out
    assert (saved / "tokenizer.json").exists() and (saved / "config.json").exists()
    tok = transformers.AutoTokenizer.from_pretrained(saved)
    assert (
        tok("hello").input_ids
        == transformers.AutoTokenizer.from_pretrained(TINY)("hello").input_ids
    )
