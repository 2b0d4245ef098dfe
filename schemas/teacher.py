"""The teacher (and a round's student) in a job spec: endpoints or managed vLLM replicas, the
authorisation block that says whose model it is, rate limits and timeouts.

Every field is documented once, with ``Field(description=...)``, like the rest of the job spec
(``schemas/job.py``).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator

from schemas.policy import endpoint_problems
from schemas.strict import Strict


class Authorization(Strict):
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


class RateLimit(Strict):
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


class ReplicaResources(Strict):
    num_gpus: float = Field(
        0, ge=0, description="GPUs per replica: the tensor-parallel size on GPU nodes; 0 on CPU."
    )
    num_cpus: float = Field(1, ge=0, description="CPUs Ray reserves per replica.")
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {teacher_replica: 1} to pin replicas "
        "to the GPU worker group of cluster.yaml.",
    )


class ReplicaSpec(Strict):
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


class TeacherSpec(Strict):
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
