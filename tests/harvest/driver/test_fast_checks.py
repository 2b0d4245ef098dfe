"""Fast checks before anything starts: validate reads the input and can reach the teacher; a
job whose endpoints have nothing listening stops before Ray; a refused resume names the field
(issue 22, point 7)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import jobs
import pytest
from fault_teacher_server import FaultTeacherServer

from harvest.cli import main
from harvest.outputs.manifest import Manifest, ResumeRefused
from workers.storage import open_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(tmp_path: Path, url: str, input_path: str, **sampling) -> Path:
    spec = jobs.job(
        jobs.model("fault", url),
        input_path,
        sampling={"max_tokens": 4, "logprobs": 2, **sampling},
        output={"dir": str(tmp_path / "out")},
    )
    return jobs.write_job(tmp_path, spec, "job.json")


def test_validate_refuses_a_missing_input(tmp_path, capsys) -> None:
    path = job(tmp_path, "http://127.0.0.1:1/v1", str(tmp_path / "nope.jsonl"))
    assert main(["validate", str(path)]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_validate_counts_rows_and_names_malformed_lines(tmp_path, capsys) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a"}\n{oops\n{"prompt": "b"}\n{"nothing": 1}\n')
    path = job(tmp_path, "http://127.0.0.1:1/v1", str(inp))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input: 4 rows in 1 file, 2 unusable" in out
    assert f"{inp}:2" in out and f"{inp}:4" in out


def test_validate_check_teacher(tmp_path, capsys) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a"}\n')
    with FaultTeacherServer() as server:
        assert main(["validate", str(job(tmp_path, server.url, str(inp))), "--check-teacher"]) == 0
        assert "teacher: fault answers at " + server.url in capsys.readouterr().out
    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["validate", str(job(tmp_path, dead, str(inp))), "--check-teacher"]) == 2
    assert "nothing listens" in capsys.readouterr().err


def test_refused_resume_names_the_field_that_changed(tmp_path) -> None:
    base = jobs.job(jobs.model("m", "http://h/v1"), sampling={"max_tokens": 4, "temperature": 1.0})
    store = open_store(str(tmp_path / "out"))
    Manifest.open(store, spec=jobs.spec(**base), input_fp="i")
    changed = {**base, "sampling": {"max_tokens": 4, "temperature": 0.5}}
    with pytest.raises(ResumeRefused, match=r"sampling\.temperature \(1\.0 -> 0\.5\)"):
        Manifest.open(store, spec=jobs.spec(**changed), input_fp="i")


def test_a_run_with_nothing_listening_says_so_before_ray_starts(tmp_path, monkeypatch, caplog):
    """The run still waits out teacher.outage_timeout_s (issue 17: the teacher may be
    restarting), but the user hears at once what is wrong and what to do, before Ray's start."""
    import logging

    from harvest.driver import scheduler

    class RayStarted(Exception):
        pass

    def init_ray(address):
        raise RayStarted

    monkeypatch.setattr(scheduler, "init_ray", init_ray)
    port = free_port()
    spec = jobs.spec(**json.loads(job(tmp_path, f"http://127.0.0.1:{port}/v1", "x").read_text()))
    with caplog.at_level(logging.WARNING), pytest.raises(RayStarted):
        scheduler._start(spec, None, None)  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and f"nothing listens at 127.0.0.1:{port}" in said[0]
    assert "teacher.outage_timeout_s" in said[0] and "start the teacher server" in said[0]
