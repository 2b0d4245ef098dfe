"""A vLLM server's own view of a run: its Prometheus counters, sampled while a contender runs.

The server counts what it generated and how many requests it runs at once, whoever the client
is, so throughput from these counters needs no trust in the contender's clock and leaves out
everything before the first token (Ray's start-up, preflight) and after the last one.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import httpx
import psutil
from treeprobe import Sampler, rates_between

GAUGES = {
    "vllm:generation_tokens_total": "gen",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:request_success_total": "done",
}


def scrape(text: str) -> dict[str, float]:
    """Each metric of ``GAUGES`` summed over its labels."""
    out = dict.fromkeys(GAUGES.values(), 0.0)
    for line in text.splitlines():
        if line.startswith("vllm:"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in GAUGES:
                out[GAUGES[name]] += float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class MetricsProbe(Sampler):
    """Sample ``base/metrics`` every ``every_s`` (a thread) until ``stop()``."""

    base: str  # http://host:port, without /v1
    every_s: float = 0.25
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    server: psutil.Process | None = None  # also sample this tree's CPU-s (key "cpu_s")

    def __post_init__(self) -> None:
        Sampler.__init__(self, self.every_s, "vllm-metrics")
        self._http = httpx.Client(timeout=5.0)

    def sample(self) -> None:
        try:
            text = self._http.get(self.base + "/metrics").text
        except httpx.HTTPError:
            return
        values = scrape(text)
        if self.server is not None:
            values["cpu_s"] = tree_cpu(self.server)
        self.samples.append((time.monotonic(), values))

    def stop(self) -> None:
        super().stop()
        self.sample()
        self._http.close()


def _at(samples: list[tuple[float, float]], level: float) -> float:
    """When the cumulative count first reached ``level`` (linear between samples)."""
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        if v1 >= level:
            return t0 + (t1 - t0) * ((level - v0) / (v1 - v0) if v1 > v0 else 1.0)
    return samples[-1][0]


def analyse(probe: MetricsProbe, t_start: float, in_flight: int) -> dict[str, float]:
    """Tokens the server generated; rates over the active span (first to last token) and the
    steady span (10% to 90% of the tokens, no ramp-up or tail); requests running there."""
    s = probe.samples
    gen = [(t, m["gen"] - s[0][1]["gen"]) for t, m in s]
    total = gen[-1][1]
    out: dict[str, float] = {"server_tokens": total}
    if total <= 0:
        return out
    first = next(i for i, (_, v) in enumerate(gen) if v > 0)
    last = next(i for i, (_, v) in enumerate(gen) if v >= total)
    t_first, t_last = gen[max(0, first - 1)][0], gen[last][0]
    t10, t90 = _at(gen, 0.1 * total), _at(gen, 0.9 * total)
    steady = [m for t, m in s if t10 <= t <= t90]
    if "cpu_s" in (rates := rates_between(s, t10, t90)):
        out["server_cores_steady"] = rates["cpu_s"]
    out["steady_t10"], out["steady_t90"] = t10, t90
    active = [m for t, m in s if t_first <= t <= t_last]
    out.update(
        first_token_s=t_first - t_start,
        last_token_s=t_last - t_start,
        active_tok_s=total / max(1e-9, t_last - t_first),
        steady_tok_s=0.8 * total / max(1e-9, t90 - t10),
        steady_span_s=t90 - t10,
        running_mean_active=_mean(m["running"] for m in active),
        running_mean_steady=_mean(m["running"] for m in steady),
        waiting_mean_steady=_mean(m["waiting"] for m in steady),
        steady_full_share=_mean(float(m["running"] + m["waiting"] >= in_flight) for m in steady),
        server_requests=s[-1][1]["done"] - s[0][1]["done"],
    )
    return out


def _mean(values) -> float:
    v = list(values)
    return sum(v) / len(v) if v else 0.0


def server_tree(port: int) -> psutil.Process | None:
    """The process listening on ``port`` (the API server; its engine is a descendant)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def tree_cpu(root: psutil.Process | None) -> float:
    """CPU seconds used so far by ``root`` and its descendants alive now."""
    if root is None:
        return 0.0
    total = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total
