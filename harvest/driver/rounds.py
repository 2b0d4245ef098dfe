"""The student of an on-policy round, on the driver: its key, replicas, preflight, provenance.

The student is checked like a teacher (reachable, serving its model, one tokenizer across its
endpoints) and then against the teacher: the teacher scores the student's token ids as they
are, so both must tokenise alike. The preflight compares the hash of each server's own
``/tokenize`` of a probe text (the one provenance stamps) and refuses a mismatch in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harvest.driver.preflight import PreflightError, TeacherInfo, check_teacher, read_api_key
from harvest.driver.replicas import ReplicaSet
from schemas.job import JobSpec


@dataclass
class Student:
    """What the workers need to reach the student, and what every shard records of it."""

    info: TeacherInfo
    api_key: str | None
    endpoints: list[str]
    replicas: ReplicaSet | None

    def actor_kwargs(self, spec: JobSpec) -> dict[str, Any]:
        workers = spec.concurrency.workers
        cap = -(-spec.concurrency.in_flight_per_endpoint // workers)
        return {"api_key": self.api_key, "endpoints": self.endpoints, "cap_per_endpoint": cap}

    def meta(self, spec: JobSpec) -> dict[str, Any]:
        assert spec.student is not None
        return {
            "student": self.info.identity(),
            "student_authorization": spec.student.authorization.model_dump(),
        }

    def stop(self) -> None:
        if self.replicas:
            self.replicas.stop()


def same_tokenizer(teacher: TeacherInfo, student: TeacherInfo) -> None:
    """Refuse, in one line, a student whose tokenizer is not the teacher's."""
    if teacher.tokenizer_hash is None or student.tokenizer_hash is None:
        raise PreflightError(
            f"cannot compare the tokenizers of student {student.model!r} and teacher "
            f"{teacher.model!r}: /tokenize is not served by both"
        )
    if teacher.tokenizer_hash != student.tokenizer_hash:
        raise PreflightError(
            f"student {student.model!r} and teacher {teacher.model!r} tokenise differently "
            f"(tokenizer hashes {student.tokenizer_hash} and {teacher.tokenizer_hash}): the "
            "teacher cannot score the student's token ids"
        )


def start_student(spec: JobSpec, job_id: str, teacher: TeacherInfo, log_dir: Path) -> Student:
    """Launch the student's replicas if it has any, and check it against the teacher."""
    student_job = spec.student_job()
    api_key = read_api_key(student_job)
    replicas = None
    endpoints = student_job.teacher.endpoints
    if student_job.teacher.replicas is not None:
        replicas = ReplicaSet(
            student_job.teacher.replicas, student_job.teacher.model, log_dir, role="student"
        )
        endpoints = replicas.wait_ready()
    try:
        try:
            info = check_teacher(student_job, api_key, job_id, endpoints)
        except PreflightError as err:
            raise PreflightError(f"student: {err}") from None
        same_tokenizer(teacher, info)
    except BaseException:
        if replicas:
            replicas.stop()
        raise
    return Student(info, api_key, endpoints, replicas)
