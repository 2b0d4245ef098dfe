"""What ``harvest validate`` says about a job's input: files, rows and unusable lines."""

from __future__ import annotations

from itertools import islice

from harvest.inputs.sources import iter_rows, scan
from schemas.job import JobSpec
from schemas.wire import RowProblem

SHOWN_PROBLEMS = 5


def describe_input(spec: JobSpec) -> str:
    """One pass over the input (the same scan a run makes: files exist, ids are unique), and
    the first few rows that would become ``InvalidInput`` failure records, with their lines."""
    inputs = scan(spec)
    files = len(inputs.files)
    lines = [
        f"input: {inputs.rows} rows in {files} file{'s' if files != 1 else ''}, "
        f"{inputs.problems} unusable (they become InvalidInput failure records)"
    ]
    if inputs.problems:
        problems = (
            row for f in inputs.files for row in iter_rows(f, spec) if isinstance(row, RowProblem)
        )
        for row in islice(problems, SHOWN_PROBLEMS):
            lines.append(f"  {row.source}: {row.reason}")
        if inputs.problems > SHOWN_PROBLEMS:
            lines.append(f"  ... and {inputs.problems - SHOWN_PROBLEMS} more")
    return "\n".join(lines)
