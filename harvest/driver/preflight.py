"""Check the teacher before any prompt is sent: reachable, serving the model, returning ids.

A job that cannot work should fail in seconds with one clear line, not after an hour of
failure rows: a wrong model name, a bad key, or a server that does not return token ids and
logprobs (only vLLM-compatible servers do) all stop the job here. A teacher that does not
answer (refused, timed out, 5xx, 429) is waited for up to ``teacher.outage_timeout_s``, as
during the harvest: a server restarting as the job starts is no configuration error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from harvest.errors import JobAborted
from harvest.watch.logs import event
from schemas.job import JobSpec
from workers import USER_AGENT
from workers.teacher.retry import parse_retry_after


class PreflightError(RuntimeError):
    """The teacher cannot serve this job; the message says which endpoint and why."""


# Exercises many tokenizer paths: casing, digits, code, punctuation, non-ASCII, whitespace.
TOKENIZER_PROBE = "Teacher-harvest probe: 12345 + 0.5 == x; def f(a): return a**2  \n\t héllo 世界!"
CHAT_PROBE = [
    {"role": "system", "content": "You are a probe."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Again?"},
]


@dataclass(frozen=True)
class TeacherInfo:
    model: str
    model_root: str | None  # what the server says it loaded (path or hub id)
    max_model_len: int | None
    tokenizer_hash: str | None  # sha256 of the served tokenizer's ids for TOKENIZER_PROBE
    chat_template_hash: str | None  # sha256 of the ids of CHAT_PROBE rendered by the server

    def identity(self) -> dict[str, Any]:
        return asdict(self)


def read_api_key(spec: JobSpec) -> str | None:
    """The key from the environment or a key file; errors name the source, never the key."""
    name, path = spec.teacher.api_key_env, spec.teacher.api_key_file
    if name is not None:
        key = os.environ.get(name, "").strip()
        if not key:
            raise PreflightError(f"teacher.api_key_env: environment variable {name} is not set")
        return key
    if path is not None:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise PreflightError(
                f"teacher.api_key_file: cannot read {path} ({err.strerror})"
            ) from None
        if not key:
            raise PreflightError(f"teacher.api_key_file: {path} is empty")
        return key
    return None


@dataclass
class _Checks:
    """What every check of one preflight shares: the client, the outage bound, the stop."""

    http: httpx.Client
    outage_s: float  # teacher.outage_timeout_s
    stop: threading.Event  # set when the preflight ends (another endpoint failed, a signal)


def _request(checks: _Checks, method: str, url: str, **kw: Any) -> httpx.Response:
    """One check, waiting for the teacher as the harvest does: a 429 for its Retry-After (or a
    growing backoff), a refused connection, a timeout or a 5xx for a short growing backoff,
    asking again until ``outage_s`` has passed since the first of them. A teacher that is down
    when the job starts (or goes down while it is checked) is waited for like one that goes down
    mid-job, and the job stops the same way: exit 1, one line, rerun to resume."""
    backoff, since, told = 0.5, 0.0, False
    while True:
        wait = None
        try:
            resp = checks.http.request(method, url, **kw)
        except httpx.TransportError as err:
            why = type(err).__name__
        else:
            if resp.status_code == 429:
                why, wait = "HTTP 429", parse_retry_after(resp.headers.get("retry-after"))
            elif resp.status_code >= 500:
                why = f"HTTP {resp.status_code}"
            else:
                return resp
        now = time.monotonic()
        since = since or now
        left = since + checks.outage_s - now
        if wait is None:
            wait, backoff = min(backoff, max(0.0, left)), min(2 * backoff, _MOST_WAIT_S)
        if wait > left or left <= 0:  # a Retry-After past the deadline: no answer in time
            raise JobAborted(
                f"teacher {url} did not answer for {checks.outage_s:g} s "
                f"(teacher.outage_timeout_s): {why}"
            )
        if not told:
            told = True
            event("teacher_unreachable", f"teacher {url} unavailable ({why}); waiting up to "
                  f"{checks.outage_s:g} s (teacher.outage_timeout_s)", logging.WARNING,
                  endpoint=url, reason=why)  # fmt: skip
        if checks.stop.wait(wait):
            raise JobAborted("preflight stopped")


_MOST_WAIT_S = 5.0  # a teacher that comes back is noticed within this


def _models(checks: _Checks, endpoint: str) -> list[dict[str, Any]]:
    try:
        resp = _request(checks, "GET", f"{endpoint}/models", timeout=10.0)
    except httpx.HTTPError as err:
        raise PreflightError(f"teacher {endpoint} unreachable: {type(err).__name__}") from None
    if resp.status_code in (401, 403):
        raise PreflightError(f"teacher {endpoint} refused our API key (HTTP {resp.status_code})")
    if resp.status_code != 200:
        raise PreflightError(f"teacher {endpoint}/models answered HTTP {resp.status_code}")
    try:
        return list(resp.json()["data"])
    except (ValueError, KeyError, TypeError):
        raise PreflightError(f"teacher {endpoint}/models is not an OpenAI model list") from None


def _tokenize_hash(checks: _Checks, endpoint: str, model: str, **what: Any) -> str | None:
    """Hash of the server's own tokenization (vLLM's /tokenize); None where unsupported (a
    server that is down is waited for: a missing hash would be recorded as its identity)."""
    root = endpoint.removesuffix("/v1")
    resp = _request(checks, "POST", f"{root}/tokenize", json={"model": model, **what})
    try:
        tokens = resp.json()["tokens"] if resp.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(tokens, list):
        return None
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


def _identify(checks: _Checks, endpoint: str, spec: JobSpec) -> TeacherInfo:
    models = {m.get("id"): m for m in _models(checks, endpoint)}
    model = spec.teacher.model
    if model not in models:
        raise PreflightError(
            f"teacher {endpoint} does not serve model {model!r} "
            f"(it serves {sorted(map(str, models))})"
        )
    return TeacherInfo(
        model=model,
        model_root=models[model].get("root"),
        max_model_len=models[model].get("max_model_len"),
        tokenizer_hash=_tokenize_hash(checks, endpoint, model, prompt=TOKENIZER_PROBE),
        chat_template_hash=_tokenize_hash(
            checks, endpoint, model, messages=CHAT_PROBE, add_generation_prompt=True
        ),
    )


def check_teacher(
    spec: JobSpec,
    api_key: str | None,
    job_id: str,
    endpoints: list[str] | None = None,
) -> TeacherInfo:
    """Every endpoint must serve the same model and tokenizer.

    The generation probe (token ids and logprobs come back) runs in a harvest worker, through
    the worker's rate limiter: see ``harvest.driver.pool.probe_teacher``."""
    endpoints = endpoints or spec.teacher.endpoints
    headers = {"User-Agent": USER_AGENT, "X-Harvest-Job-Id": job_id}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    # One client (one connection pool) for all checks; endpoints are checked concurrently.
    # The checks end with the preflight: a signal or another endpoint's error does not leave
    # one waiting for its teacher.
    with httpx.Client(headers=headers, verify=spec.teacher.tls_verify) as http:
        checks = _Checks(http, spec.teacher.outage_timeout_s, threading.Event())
        pool = ThreadPoolExecutor(max_workers=min(16, len(endpoints)))
        try:
            found = pool.map(lambda e: _identify(checks, e, spec), endpoints)
            infos = dict(zip(endpoints, found, strict=True))
        finally:
            checks.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
    first_endpoint, first = next(iter(infos.items()))
    for endpoint, info in infos.items():
        for attr, what in (
            ("tokenizer_hash", "tokenizers"),
            ("chat_template_hash", "chat templates"),
        ):
            if getattr(info, attr) != getattr(first, attr):
                raise PreflightError(
                    f"teachers {first_endpoint} and {endpoint} serve different {what} under the "
                    f"name {spec.teacher.model!r}; one job must use one teacher"
                )
    return first


def above_cap_line(k: int, max_logprobs: int | None) -> str:
    """The one line for a job whose K the teacher refused, and how to raise the server's cap."""
    cap = "fewer (it did not say how many)" if max_logprobs is None else f"at most {max_logprobs}"
    return (
        f"teacher serves {cap} logprobs per token, the job asks sampling.logprobs={k}: start the "
        f"server with --max-logprobs {k} (managed replicas: add it to teacher.replicas.vllm_args)"
    )


# vLLM's --logprobs-mode values, and what a record's logprobs then are.
LOGPROB_MODES = {
    "raw_logprobs": "the model's log-probabilities before temperature, top-p and penalties "
    "(vLLM's default)",
    "processed_logprobs": "log-probabilities after temperature, top-p and penalties (the "
    "distribution actually sampled from)",
    "raw_logits": "the model's logits (not log-probabilities) before any processing",
    "processed_logits": "logits after temperature, top-p and penalties (not log-probabilities)",
}


def classify_logprob_mode(tops: dict[float, list[float]]) -> tuple[str, str]:
    """vLLM's name for what the server returns, and why we think so.

    ``tops`` maps a temperature to the first generated token's top-K values for the same
    prompt. Raw values ignore temperature, processed ones are rescaled by it. Log-probabilities
    are never positive and their top-K probability mass is at most 1; logits need be neither.
    Logits that happen to look like log-probabilities (all negative, small mass) are read as
    log-probabilities: top-K values alone cannot tell them apart.
    """
    if len(tops) < 2 or not all(tops.values()):
        return "unknown", "no top logprobs to compare (logprobs: 0, or the mode probe failed)"
    (t_a, a), (t_b, b) = sorted(tops.items(), reverse=True)[:2]
    values = [*a, *b]
    mass = max(sum(math.exp(min(v, 700.0)) for v in a), sum(math.exp(min(v, 700.0)) for v in b))
    logits = max(values) > 1e-6 or mass > 1.0 + 1e-3
    same = len(a) == len(b) and all(
        abs(x - y) <= 1e-3 * max(1.0, abs(x)) for x, y in zip(a, b, strict=True)
    )
    mode = f"{'raw' if same else 'processed'}_{'logits' if logits else 'logprobs'}"
    how = (
        f"top-{len(a)} values {'identical' if same else 'rescaled'} at temperature {t_a:g} and "
        f"{t_b:g}; max {max(values):.3g}, top-K probability mass {min(mass, 1e9):.3g}"
    )
    return mode, how
