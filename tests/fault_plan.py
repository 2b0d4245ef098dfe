"""What the fault-injecting teacher does to each request: the plan, its log records, the key.

Kept apart from the server (tests/fault_teacher_server.py) so the decision of a fault stays a
pure function of (seed, key, attempt), testable without a socket.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fake_teacher import decode_prompt

FAULTS = ("429", "500", "503", "reset", "stall", "truncated", "malformed")


@dataclass(frozen=True)
class FaultPlan:
    """Per-attempt fault probabilities (mutually exclusive, sum <= 1) and service behaviour."""

    rate_429: float = 0.0
    retry_after_s: float = 0.0  # sent with every 429 (delta-seconds, e.g. "1" or "0.05")
    retry_after_http_date: bool = False  # send an IMF-fixdate instead, rounded up to whole s
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_reset: float = 0.0  # RST after reading the request, no response bytes
    rate_stall: float = 0.0
    stall_s: float = 0.0  # sleep this long, then answer (the client should time out first)
    rate_truncated: float = 0.0  # 200, Content-Length of the first half of the real body
    rate_malformed: float = 0.0  # 200 of the right shape but one token's logprob is null
    always_400: frozenset[str] | set[str] = frozenset()
    always_503: frozenset[str] | set[str] = frozenset()
    always_malformed: frozenset[str] | set[str] = frozenset()  # a wrong-shape 200 every time
    always_endless: frozenset[str] | set[str] = frozenset()  # a 200 whose body never ends
    no_chat_template: bool = False  # /tokenize with messages: 400, as vLLM for a base model
    storm_s: float = 0.0  # from the first request on, answer everything 429 for this long
    latency_s: float = 0.0  # fixed service time of every real answer
    capacity: int | None = None  # answers served at once; the rest queue
    max_logprobs: int | None = None  # as vLLM's --max-logprobs: a larger K gets vLLM's 400
    seed: int = 0
    faulty_attempts: int = 2  # only attempts 1..faulty_attempts of a key may be faulted
    # The teacher dies when its down_after-th generation request (/v1/completions or
    # /v1/chat/completions) arrives (that request is never answered; outcome "down"), once per
    # plan: a kill at an exact moment of the job.
    down_after: int = 0
    # How it dies: False, like a killed process (every connection reset at once); True, like a
    # graceful shutdown (new connections refused, requests already in service still answered,
    # any later request on a kept-alive connection dropped unanswered).
    down_graceful: bool = False

    def __post_init__(self) -> None:
        rates = [getattr(self, f"rate_{f}") for f in FAULTS]
        if min(rates) < 0 or sum(rates) > 1.0 + 1e-9:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {rates}")

    def decide(self, key: str, attempt: int) -> str:
        """The outcome for this key's ``attempt``-th request: "ok", "400" or a fault name. A
        batch (keys joined by ``BATCH_SEP``) gets an ``always_*`` outcome if any prompt has it."""
        keys = set(key.split(BATCH_SEP))
        if keys & self.always_400:
            return "400"
        if keys & self.always_503:
            return "503"
        if keys & self.always_malformed:
            return "malformed"
        if keys & self.always_endless:
            return "endless"
        if attempt > self.faulty_attempts:
            return "ok"
        digest = hashlib.blake2b(f"{self.seed}\0{attempt}\0{key}".encode(), digest_size=8)
        u = int.from_bytes(digest.digest(), "big") / 2**64
        for fault in FAULTS:
            u -= getattr(self, f"rate_{fault}")
            if u < 0:
                return fault
        return "ok"


@dataclass
class Record:
    """One request as the server saw it (times from ``time.monotonic`` unless ``wall``)."""

    t: float  # arrival (request fully read)
    wall: float
    path: str
    key: str | None  # prompt text / last user message; None for GET and unparseable bodies
    attempt: int  # 1-based per key; 0 when there is no key
    outcome: str  # "ok" | "400" | "404" | a FAULTS name ("429" also for a storm)
    retry_after: str | None
    user_agent: str | None
    job_id: str | None
    authorization: str | None
    t_served: float | None = None  # service began (after the capacity queue)
    busy: int = 0  # answers in service when this one began, itself included
    t_done: float | None = None  # response written, connection reset, or handler cancelled
    sent: int = 0  # body bytes the client took (an endless answer: until it hung up)
    rss: tuple[int, int] | None = None  # an endless answer: the reader's RSS at start, at most


BATCH_SEP = "\x1f"  # joins the keys of a batch's prompts


def prompt_key(body: dict[str, Any]) -> str | None:
    """What identifies a request for attempts, ``always_400`` and ``always_503``: a batch (a
    list of id lists) is its prompts' keys joined by ``BATCH_SEP``."""
    messages: Any = body.get("messages")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return BATCH_SEP.join(str(prompt_key({"prompt": p})) for p in prompt)
    if isinstance(prompt, list):
        try:
            decoded = decode_prompt([int(i) for i in prompt])
        except (TypeError, ValueError):
            decoded = None
        if decoded is None:
            return str(prompt)
        if isinstance(decoded, str):
            return decoded
        messages = decoded
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1].get("content")) if users else ""
    return None if prompt is None else str(prompt)


ALWAYS_CHARGED = frozenset({"truncated", "malformed"})  # a wrong-shape 200 is the row's attempt
NEVER_CHARGED = frozenset({"429"})  # a 429 pauses the endpoint; it is no attempt of the row


def check_attempts(outcomes: list[str], charged: int, *, also_sent: int = 0, exact: bool) -> None:
    """What a client that recovered a row after ``charged`` attempts must have sent.

    ``outcomes``: the row's ``/v1/completions`` requests as the server saw them, in order;
    ``also_sent``: its other requests (``/tokenize`` for a chat row, which can time out too).
    A 429 is never an attempt; a wrong-shape 200 always is; an endpoint failure (5xx, reset,
    timeout) is unless the endpoint was out of rotation, which the server cannot see. Under
    load a request can also time out in the client and still be answered "ok" by the server,
    so only ``exact`` (no timeouts expected) asks for nothing but faults before the last "ok",
    and for the exact count when every fault was a charged one."""
    assert outcomes and outcomes[-1] == "ok", outcomes
    sent = sum(o not in NEVER_CHARGED for o in outcomes) + also_sent
    assert 1 + sum(o in ALWAYS_CHARGED for o in outcomes) <= charged <= sent, (outcomes, charged)
    if exact:
        assert "ok" not in outcomes[:-1], outcomes
        if set(outcomes) <= NEVER_CHARGED | ALWAYS_CHARGED | {"ok"}:
            assert charged == sent, (outcomes, charged)
