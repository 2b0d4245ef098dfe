"""The preflight probe: one tiny real request per kind of row, through the harvest client.

It runs in a harvest worker with the job's own client (same K, same rate limiter, same path as
real rows: chat rows through ``/tokenize``), so a job the teacher cannot serve - a K above the
server's ``--max-logprobs``, a model without a chat template, a bad key - stops in seconds with
one line, not after a million failure rows. A second completion at another temperature tells
which logprob mode the server runs (``harvest.driver.preflight.classify_logprob_mode``). In score
mode the probe rows carry a response to score, so the probe takes the scoring path (``/tokenize``,
``prompt_logprobs``); vLLM computes prompt logprobs before any sampling processor, so there the
values do not move with the temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.wire import PromptRow
from workers.errors import HarvestError, LogprobsAboveCap, TeacherOutage
from workers.teacher.client import TeacherClient

KINDS = ("chat", "completions")
PROBE_TEXT = "Hello"
PROBE_RESPONSE = "Hi there"  # score mode: a text to score after the probe prompt
PROBE_SEED = 1234
MODE_TEMPERATURES = (1.0, 0.5)


@dataclass
class ProbeResult:
    """Per kind of row, why the teacher could not serve it; the mode probe's top logprobs."""

    failed: dict[str, str] = field(default_factory=dict)
    # temperature -> the first generated token's top-K logprobs (best first)
    tops: dict[float, list[float]] = field(default_factory=dict)
    mode_error: str | None = None
    # The server refused the job's K (``LogprobsAboveCap``): its cap when it said, else None.
    above_cap: bool = False
    max_logprobs: int | None = None


def probe_row(kind: str, temperature: float, score: bool = False) -> PromptRow:
    """A tiny row of ``kind``; in score mode with a response (an assistant turn) to score."""
    overrides = {"max_tokens": 2, "n": 1, "temperature": temperature, "seed": PROBE_SEED}
    if kind == "chat":
        messages = [{"role": "user", "content": PROBE_TEXT}]
        if score:
            messages.append({"role": "assistant", "content": PROBE_RESPONSE})
        return PromptRow("preflight-chat", "preflight", messages=messages, overrides=overrides)
    return PromptRow(
        "preflight-completions", "preflight", prompt=PROBE_TEXT, overrides=overrides,
        response=PROBE_RESPONSE if score else None,
    )  # fmt: skip


def _why(err: HarvestError) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever the server sent


async def probe(client: TeacherClient, kinds: list[str]) -> ProbeResult:
    """Send one request per kind in ``kinds`` (and one more for the logprob mode)."""
    result = ProbeResult()
    score = client.spec.mode == "score"
    mode_kind = "completions" if "completions" in kinds else "chat"
    for kind in (k for k in KINDS if k in kinds):
        try:
            done = await client.complete(probe_row(kind, MODE_TEMPERATURES[0], score))
        except TeacherOutage:
            raise  # the teacher went away, as it may mid-job: the job's outage stop, not ours
        except HarvestError as err:
            result.failed[kind] = _why(err)
            if isinstance(err, LogprobsAboveCap):  # every row would fail so: stop here
                result.above_cap, result.max_logprobs = True, err.max_allowed
                return result
            continue
        if kind == mode_kind:
            result.tops[MODE_TEMPERATURES[0]] = _first_top(done.samples)
    if result.failed or not kinds:
        return result
    try:
        done = await client.complete(probe_row(mode_kind, MODE_TEMPERATURES[1], score))
        result.tops[MODE_TEMPERATURES[1]] = _first_top(done.samples)
    except TeacherOutage:
        raise
    except HarvestError as err:
        result.mode_error = _why(err)
    return result


def _first_top(samples: list) -> list[float]:
    tops = samples[0].top_logprobs if samples else []
    return [float(v) for v in tops[0]] if len(tops) else []
