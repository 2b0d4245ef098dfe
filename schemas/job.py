"""The job spec: what a user writes in ``job.yaml``.

Every field is documented once, here, with ``Field(description=...)``; ``harvest schema`` prints
the JSON Schema built from these models and ``harvest validate`` the resolved spec. Unknown keys
are rejected (``extra="forbid"``) so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.policy import endpoint_problems


class SpecError(ValueError):
    """The job file cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_credentials(location: str) -> str:
    """Reject ``s3://KEY:SECRET@bucket`` and the like: credentials live in the environment."""
    if "://" in location:
        parts = urlsplit(location)
        if parts.username or parts.password:
            raise ValueError(
                "credentials do not belong in a location; use the environment (e.g. "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the standard credential chain"
            )
    return location


class InputSpec(_Strict):
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
        return _no_credentials(path)


class Authorization(_Strict):
    owner: str = Field(
        min_length=1, description="Who owns the teacher or holds the right to distil it."
    )
    license: str = Field(
        min_length=1,
        description="Licence or agreement permitting distillation (e.g. 'apache-2.0' or an "
        "internal agreement id).",
    )
    attestation: str = Field(
        min_length=1, description="Free text: why this harvest is authorised. Stamped on shards."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Public host names you own or are licensed to query. Loopback, private "
        "addresses and cluster-internal names need no listing.",
    )
    provider_agreement: str | None = Field(
        None,
        description="Your agreement with a hosted LLM API provider that permits distilling its "
        "model. Without it such providers are refused, even when listed in allowed_hosts.",
    )


class RateLimit(_Strict):
    requests_per_s: float | None = Field(
        None,
        gt=0,
        description="Most generation requests sent in any one-second window, job-wide (the "
        "/tokenize calls that render chat rows are not counted).",
    )
    tokens_per_min: int | None = Field(
        None,
        gt=0,
        description="Most completion tokens in any one-minute window, job-wide (each request "
        "reserves max_tokens x n until its answer says how many it used). In score mode, the "
        "tokens scored.",
    )


RESERVED_VLLM_ARGS = ("--model", "--served-model-name", "--host", "--port")


class ReplicaResources(_Strict):
    num_gpus: float = Field(
        0, ge=0, description="GPUs per replica: the tensor-parallel size on GPU nodes; 0 on CPU."
    )
    num_cpus: float = Field(1, ge=0, description="CPUs Ray reserves per replica.")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {teacher_replica: 1} to pin replicas "
        "to the GPU worker group of cluster.yaml.",
    )


class ReplicaSpec(_Strict):
    count: int = Field(1, ge=1, description="How many vLLM servers to launch.")
    model: str = Field(
        min_length=1,
        description="What each server loads (vLLM's --model): a path on the replica nodes or a "
        "model id their cache holds. Served under teacher.model.",
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="Extra server arguments, e.g. ['--dtype', 'bfloat16', "
        "'--tensor-parallel-size', '2']. Host, port and model names are set by the replica.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for the servers, e.g. VLLM_CPU_KVCACHE_SPACE.",
    )
    resources: ReplicaResources = Field(
        default_factory=lambda: ReplicaResources(), description="Ray resources per replica."
    )
    host: str | None = Field(
        None,
        description="Address the servers bind and are reached on. Default: the node's address "
        "as Ray sees it; '127.0.0.1' keeps a single-machine job on loopback.",
    )
    startup_timeout_s: float = Field(600, gt=0, description="Longest wait for /health at start.")
    max_restarts: int = Field(
        3, ge=0, description="How often Ray restarts a replica whose server died."
    )
    cache_dir: str | None = Field(
        None,
        description="Folder for vLLM's compile caches, shared by restarts and reruns (default: "
        "~/.cache/teacher-harvest/vllm).",
    )

    @field_validator("vllm_args")
    @classmethod
    def _not_reserved(cls, args: list[str]) -> list[str]:
        for arg in args:
            if arg.split("=")[0] in RESERVED_VLLM_ARGS:
                raise ValueError(f"{arg.split('=')[0]} is set by the replica itself")
        return args


class TeacherSpec(_Strict):
    model: str = Field(min_length=1, description="Model name as served (`--served-model-name`).")
    endpoints: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible base URLs of servers you run, e.g. "
        "'http://10.0.0.5:8000/v1' (a URL without a path gets '/v1'). Or use replicas.",
    )
    replicas: ReplicaSpec | None = Field(
        None, description="Launch the teacher as vLLM servers on the Ray cluster instead."
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key. Keys are never read "
        "from the job file.",
    )
    api_key_file: str | None = Field(
        None, description="Path of a file holding the API key (alternative to api_key_env)."
    )
    tls_verify: bool | str = Field(
        True,
        description="Verify TLS certificates (true), or a CA bundle path. Never off by default.",
    )
    transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="HTTP library under the client. aiohttp (default) posts directly on its own "
        "pool and costs the worker far less CPU per answer than httpx, whose pool bookkeeping "
        "grows with requests in flight (bench/README.md); httpx remains as a fallback. Both "
        "take a CA-bundle tls_verify and raise the same error classes.",
    )
    rate_limit: RateLimit = Field(
        default_factory=lambda: RateLimit(),
        description="Optional client-side limits, never exceeded. 429s from the teacher are "
        "honoured whether or not these are set.",
    )
    authorization: Authorization = Field(
        description="Who authorised distilling this teacher, and under which licence."
    )
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_attempts: int = Field(
        6, ge=1, le=50, description="Attempts per request before it becomes a failure row."
    )
    max_request_time_s: float = Field(
        900.0,
        gt=0,
        description="Cap on the time spent on one request's own attempts and backoff. Time "
        "spent waiting for a usable endpoint (paused by a 429, circuit open) is not counted: "
        "outage_timeout_s bounds that.",
    )
    outage_timeout_s: float = Field(
        600.0,
        gt=0,
        description="How long the job waits while no endpoint is usable (every one down, or "
        "paused by 429 Retry-After) before it stops with exit code 1. Rows waiting meanwhile "
        "are not failed; committed shards are kept and a rerun resumes.",
    )
    backoff_initial_s: float = Field(
        0.5, gt=0, description="Initial retry backoff; grows exponentially, with full jitter."
    )
    backoff_max_s: float = Field(30.0, gt=0, description="Largest single retry backoff.")

    @field_validator("endpoints")
    @classmethod
    def _normalise_endpoints(cls, urls: list[str]) -> list[str]:
        out = []
        for url in urls:
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
            if parts.username or parts.password:
                raise ValueError("credentials do not belong in an endpoint URL; use api_key_env")
            if parts.query or parts.fragment:
                raise ValueError(f"an endpoint is a base URL, without query or fragment: {url!r}")
            netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
            if ":" in parts.hostname:  # IPv6 literal
                netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
            path = parts.path.rstrip("/") or "/v1"
            out.append(urlunsplit((parts.scheme.lower(), netloc, path, "", "")))
        if len(set(out)) != len(out):
            raise ValueError("endpoints are listed twice")
        return out

    @model_validator(mode="after")
    def _authorised_endpoints(self) -> TeacherSpec:
        if bool(self.endpoints) == bool(self.replicas):
            raise ValueError("give either endpoints (servers you run) or replicas (launched here)")
        auth = self.authorization
        problems = endpoint_problems(self.endpoints, auth.allowed_hosts, auth.provider_agreement)
        if problems:
            raise ValueError("; ".join(problems))
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        return self

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError("must be an environment variable name, not a key")
        return name


MAX_K = 1024  # no server limit: a sanity bound (a K=1024 record is ~12 KB per token)


class SamplingSpec(_Strict):
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


class OutputSpec(_Strict):
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
        return _no_credentials(location)


class ConcurrencySpec(_Strict):
    workers: int = Field(2, ge=1, description="Harvest actors (Ray workers).")
    in_flight_per_endpoint: int = Field(
        32, ge=1, description="Requests in flight per endpoint, summed over all workers."
    )
    worker_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves for each worker.")


Mode = Literal["generate", "score", "round"]


class JobSpec(_Strict):
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
