"""pyproject.toml and README.md state the same cost for the numpy parser fallback."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_and_readme_agree_on_the_fallback_cost() -> None:
    readme = " ".join(ROOT.joinpath("README.md").read_text().split())
    comment = " ".join(
        line.lstrip("# ") for line in ROOT.joinpath("pyproject.toml").read_text().splitlines()
        if line.startswith("#")
    )  # fmt: skip
    assert "about twice the worker CPU per top-20 answer" in readme
    assert "about twice the worker CPU per top-20 answer" in comment
    assert not re.search(r"~\s*10\s*x the CPU per answer", comment)
