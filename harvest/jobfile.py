"""A job file read from disk: YAML or JSON, validated, relative paths resolved against its folder.

Kept out of ``schemas/`` (contracts only): reading files is the driver's job.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from schemas.job import JobSpec, SpecError, parse_job
from schemas.teacher import TeacherSpec


def load_job(path: str | Path) -> JobSpec:
    """Load a YAML or JSON job file and resolve relative paths against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read job file ({err})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise SpecError(f"{path}: not valid YAML ({where}{problem})") from None
    spec = parse_job(data, str(path))
    base = path.resolve().parent
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": _under(base, spec.input.path)}),
            "output": spec.output.model_copy(update={"dir": _under(base, spec.output.dir)}),
            "teacher": _key_file_under(base, spec.teacher),
            "student": spec.student and _key_file_under(base, spec.student),
        }
    )


def _key_file_under(base: Path, model: TeacherSpec) -> TeacherSpec:
    key_file = model.api_key_file and _under(base, model.api_key_file)
    return model.model_copy(update={"api_key_file": key_file})


def _under(base: Path, p: str) -> str:
    """``p`` resolved against the job file's folder; URIs (``s3://...``) are left as they are."""
    return p if "://" in p or Path(p).is_absolute() else str(base / p)
