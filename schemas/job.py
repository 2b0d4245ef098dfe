"""The job spec: what a user writes in ``job.yaml``.

Every field is documented once, with ``Field(description=...)``, here and (the teacher and the
student) in ``schemas/teacher.py``; ``harvest schema`` prints the JSON Schema built from these
models and ``harvest validate`` the resolved spec. Unknown keys are rejected
(``extra="forbid"``) so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from schemas.strict import SpecError, Strict, no_credentials
from schemas.teacher import TeacherSpec


class InputSpec(Strict):
    path: str = Field(
        description="A JSONL or Parquet file, or a glob of them (e.g. 'data/*.jsonl' or "
        "'s3://bucket/prompts/*.parquet'). Relative paths are resolved against the job file's "
        "folder. Object-store settings and credentials come from the environment."
    )
    prompt_field: str = Field("prompt", description="Column holding plain prompt text.")
    messages_field: str = Field(
        "messages", description="Column holding chat messages: a list of {role, content}."
    )
    response_field: str = Field(
        "response",
        description="Score mode: column holding the response text to score after a plain "
        "prompt. Chat rows carry their responses as assistant turns instead. Unused in "
        "generate mode.",
    )
    id_field: str = Field(
        "id",
        description="Column holding a stable prompt id. Rows without it get an id derived from "
        "the file name and line (JSONL) or row number (Parquet), stable across reruns.",
    )
    format: Literal["rows", "harvest"] = Field(
        "rows",
        description="'rows': path names JSONL/Parquet files of rows. 'harvest' (score mode): "
        "path is another harvest's output (a folder or s3:// / gs:// URI); its committed data "
        "shards are the rows, and their token ids are scored exactly as stored.",
    )
    overrides_field: str = Field(
        "sampling",
        description="Column holding per-row sampling overrides (a dict with any of max_tokens, "
        "temperature, top_p, n, seed, stop). Not read in score mode, where nothing is sampled.",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return no_credentials(path)


MAX_K = 1024  # no server limit: a sanity bound (a K=1024 record is ~12 KB per token)


class SamplingSpec(Strict):
    max_tokens: int = Field(256, ge=1, description="Largest number of tokens per response.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, le=64, description="Samples per prompt (one record each).")
    seed: int | None = Field(None, description="Sampling seed, for reproducible samples.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    logprobs: int = Field(
        5,
        ge=0,
        le=MAX_K,
        description="K: how many top alternatives to record per token (fixed per job; every "
        "record carries exactly K). 0 keeps only the sampled tokens' logprobs. The server's "
        "--max-logprobs decides how high K may go (vLLM's default is 20): the preflight asks "
        f"the teacher at this K and stops the job in seconds if it refuses. {MAX_K} bounds "
        "only a typo (a record holds K alternatives per token).",
    )


OVERRIDABLE = ("max_tokens", "temperature", "top_p", "n", "seed", "stop")


class OutputSpec(Strict):
    dir: str = Field(
        "out",
        description="Output folder (relative to the job file) or an s3:// or gs:// URI; "
        "`--output` overrides it. Credentials come from the environment, never from here.",
    )
    rows_per_shard: int = Field(
        2000, ge=1, description="Target records per data shard (a work unit's size)."
    )
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = Field(
        "zstd", description="Parquet compression codec."
    )
    logprob_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Type of the logprobs/top_logprobs columns: float16 stores them in half "
        "the bytes, rounded to ~3 significant digits (bench/README.md measures both).",
    )

    topk_encoding: Literal["float32", "compact"] = Field(
        "float32",
        description="How the top-K is stored. float32: top_token_ids / top_logprobs columns "
        "any Parquet reader can read (logprob_dtype sets their type). compact: one binary "
        "top_k_compact column per record (ids sorted and delta-coded, logprobs as gaps below "
        "the token's best in 1/16-nat steps, at most 1/32 nat off), about half of float32's "
        "bytes at K=128 (bench/README.md); harvest's readers decode it, plain Parquet readers "
        "do not. Each shard's metadata names its encoding and the error measured on it.",
    )

    @field_validator("dir")
    @classmethod
    def _dir(cls, location: str) -> str:
        return no_credentials(location)


class ConcurrencySpec(Strict):
    workers: int = Field(2, ge=1, description="Harvest actors (Ray workers).")
    in_flight_per_endpoint: int = Field(
        32,
        ge=1,
        description="Requests in flight per endpoint, summed over all workers; a score-mode "
        "request that carries several rows (score_rows_per_request) counts as that many, so "
        "the teacher holds as many sequences at once as without batches.",
    )
    worker_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves for each worker.")
    score_rows_per_request: int = Field(
        8,
        ge=1,
        le=64,
        description="Score mode: rows of token ids (scored as given) sent together in one "
        "/v1/completions request, as a list of prompts that vLLM answers with one choice each. "
        "It divides the client's and the server's per-request work; a request that fails is "
        "sent again row by row, so one bad row is one failure record. 1 sends every row "
        "alone; rows that must be tokenised (text, chat) are always sent alone.",
    )


Mode = Literal["generate", "score", "round"]


class JobSpec(Strict):
    mode: Mode = Field(
        "generate",
        description="'generate': the teacher samples responses to the prompts. 'score': the rows "
        "already hold responses (a prompt and input.response_field, or chat messages with "
        "assistant turns) and the teacher scores them token by token (teacher forcing, vLLM's "
        "prompt_logprobs): records get each token's logprob, the top-K and a loss_mask over the "
        "response. Of sampling, only logprobs (K) applies in score mode. 'round' (on-policy "
        "distillation): the student samples responses to the prompts (sampling applies to it) "
        "and the teacher scores each sample's exact token ids as it arrives; records hold the "
        "student's ids and logprobs (student_logprobs) and the teacher's logprobs and top-K.",
    )
    input: InputSpec = Field(description="Where the prompts come from.")
    teacher: TeacherSpec = Field(description="The teacher model and how to reach it.")
    student: TeacherSpec | None = Field(
        None,
        description="Round mode: the student model that samples, and how to reach it "
        "(endpoints or replicas, key, rate limits, retries: the same fields as teacher, with "
        "its own authorization block). Its tokenizer must be the teacher's.",
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="How to sample.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where records go.")
    concurrency: ConcurrencySpec = Field(
        default_factory=ConcurrencySpec, description="How much work runs at once."
    )

    @model_validator(mode="before")
    @classmethod
    def _input_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("input"), str):
            data = {**data, "input": {"path": data["input"]}}
        return data

    @model_validator(mode="after")
    def _one_record_per_scored_row(self) -> JobSpec:
        if self.mode == "score" and self.sampling.n != 1:
            raise ValueError("score mode scores the one text each row holds: sampling.n must be 1")
        if self.input.format == "harvest" and self.mode != "score":
            raise ValueError("input.format 'harvest' is read in score mode only")
        if (self.mode == "round") != (self.student is not None):
            raise ValueError("a student is given in round mode, and only there")
        return self

    def student_job(self) -> JobSpec:
        """Round mode: the student's side, a generate job (sampled-token logprobs only)."""
        assert self.student is not None
        sampling = self.sampling.model_copy(update={"logprobs": 0})
        return self.model_copy(
            update={
                "mode": "generate",
                "teacher": self.student,
                "student": None,
                "sampling": sampling,
            }
        )

    def teacher_job(self) -> JobSpec:
        """Round mode: the teacher's side, a score job on the student's ids at K."""
        sampling = SamplingSpec(logprobs=self.sampling.logprobs)
        return self.model_copy(update={"mode": "score", "student": None, "sampling": sampling})

    def fingerprint(self) -> str:
        """Hash of what decides the records' content: mode, teacher, sampling, input columns.

        Generate-mode jobs hash as they did before score mode existed, so their outputs resume."""
        generate = self.mode == "generate"
        keep = {
            "teacher_model": self.teacher.model,
            "sampling": self.sampling.model_dump(),
            "input": self.input.model_dump(
                exclude={"path", "response_field", "format"} if generate else {"path", "format"}
            ),
            "rows_per_shard": self.output.rows_per_shard,  # decides the unit boundaries
        }
        if self.output.logprob_dtype != "float32":  # shards of one job share one schema
            keep["logprob_dtype"] = self.output.logprob_dtype
        if self.output.topk_encoding != "float32":
            keep["topk_encoding"] = self.output.topk_encoding
        if not generate:
            keep["mode"] = self.mode
        if self.input.format != "rows":  # jobs from before input.format hash as they did
            keep["input"]["format"] = self.input.format
        if self.student is not None:
            keep["student_model"] = self.student.model
        blob = json.dumps(keep, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _error_lines(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])
        else:
            msg = e["msg"]
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_job(data: Any, source: str = "job") -> JobSpec:
    """Validate a decoded job document; errors name each bad key by its dotted path."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {_error_lines(err)}") from None
