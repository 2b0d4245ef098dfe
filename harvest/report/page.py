"""The report's HTML: sections of figures (``data-n`` spans carry each count, for tools)."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import numpy as np

from harvest.report import charts
from harvest.report.collect import ReportData

STYLE = """body{font-family:sans-serif;max-width:60em;margin:1em auto;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.chart{margin:.5em 0}.chart svg{max-width:100%;height:auto}"""


def _n(key: str, value: Any) -> str:
    return f'<span class="n" id="n-{key}" data-n="{html.escape(str(value))}">{value:,}</span>'


def _chart(name: str, svg: str) -> str:
    return f'<div class="chart" id="chart-{name}">{svg}</div>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _harvested(d: ReportData) -> list[str]:
    max_tokens = (d.meta.get("sampling") or {}).get("max_tokens")
    finish = {k: d.finish[k] for k in sorted(d.finish, key=lambda k: -d.finish[k])}
    parts = [
        "<h2>What was harvested</h2>",
        f"<p>prompts: {_n('prompts', len(d.prompts))} &middot; samples: {_n('samples', d.samples)}"
        f" &middot; response tokens: {_n('tokens', d.tokens)} &middot; prompt tokens: "
        f"{_n('prompt-tokens', d.prompt_tokens)} &middot; failed prompts: "
        f"{_n('failed-prompts', d.failed_prompts)}</p>",
        "<h3>Finish reasons</h3>",
        _table(
            ["reason", "samples"],
            [[html.escape(k), _n(f"finish-{k}", v)] for k, v in finish.items()],
        ),
        _chart("finish", charts.bars(finish, "samples")),
        "<h3>Response lengths</h3>",
        _chart("lengths", charts.histogram(d.length_array, "response tokens", max_tokens)),
    ]
    if d.failures:
        parts.append("<h3>Failures by class</h3>")
        rows = []
        for c in sorted(d.failures.values(), key=lambda c: -len(c.prompts)):
            messages = "<br>".join(html.escape(f"{m} ({n})") for m, n in c.messages.most_common(5))
            examples = "<br>".join(
                html.escape(f"{e['prompt_id']} @ {e['source'] or '-'}: {e['message']}")
                for e in c.examples
            )
            rows.append([html.escape(c.name), _n(f"failed-{c.name}", len(c.prompts)), messages,
                         examples])  # fmt: skip
        parts.append(_table(["class", "prompts", "messages", "examples"], rows))
    return parts


def _teacher(d: ReportData) -> list[str]:
    pos, means = d.position_means()
    if not len(pos):
        return ["<h2>The teacher's distribution</h2><p>no data records</p>"]
    overall = {k: float(np.nansum(means[k] * d.by_position["count"][: len(pos)])
                        / d.by_position["count"][: len(pos)].sum()) for k in means}  # fmt: skip
    return [
        "<h2>The teacher's distribution</h2>",
        f"<p>top-{d.k}, means over all tokens: sampled-token logprob {overall['logprob']:.3f}, "
        f"top-1 probability {overall['top1']:.3f}, top-{d.k} mass {overall['mass']:.4f} "
        f"(tail {1 - overall['mass']:.4f}), entropy {overall['entropy']:.3f} nats</p>",
        _chart("by-position", charts.by_position(pos, means)),
    ]


def _when(iso_or_ts: Any) -> str:
    if isinstance(iso_or_ts, int | float):
        return datetime.fromtimestamp(iso_or_ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return html.escape(str(iso_or_ts))


def _run(d: ReportData) -> list[str]:
    parts = ["<h2>How the run went</h2>"]
    s = d.status
    if s is None:
        parts.append("<p>no status file (no run has written one)</p>")
    else:
        parts.append(
            f"<p>last run: {html.escape(s.state)} {html.escape(s.reason)}, started "
            f"{_when(s.started_at)}, updated {_when(s.updated_at)}; "
            f"{_n('run-prompts', s.run_prompts)} prompts, {_n('run-tokens', s.run_tokens)} tokens "
            f"({s.tokens_per_s_overall:,.0f} tok/s); retries {_n('retries', s.retries)}, worker "
            f"restarts {_n('worker-restarts', s.worker_restarts)}, replica restarts "
            f"{_n('replica-restarts', s.replica_restarts)}</p>"
        )
        parts.append(_chart("throughput", charts.over_time(s.history)))
        parts.append(_chart("endpoints", charts.per_endpoint_over_time(s.history)))
        rows = [[html.escape(url), html.escape(ep.state), str(s.circuits_opened.get(url, 0)),
                 html.escape(", ".join(f"{k}: {v}" for k, v in sorted(ep.requests.items())))]
                for url, ep in sorted(s.endpoints.items())]  # fmt: skip
        parts.append(_table(["endpoint", "state", "circuits opened", "HTTP requests"], rows))
    latency = {e: np.concatenate(v) for e, v in d.latency.items()}
    parts.append(_chart("latency", charts.latency_by_endpoint(latency)))
    if d.events:
        rows = [[_when(e.get("time")), html.escape(e.get("event", "")),
                 html.escape(e.get("message", ""))] for e in d.events[-200:]]  # fmt: skip
        parts += ["<h3>Run log: outages, retries, restarts</h3>",
                  _table(["time", "event", "message"], rows)]  # fmt: skip
    return parts


def render(d: ReportData) -> str:
    teacher = (d.meta.get("teacher") or {}).get("model", "?")
    body = [
        f"<h1>Harvest report: {html.escape(str(d.out))}</h1>",
        f"<p>job {html.escape(str(d.meta.get('job_id')))}, teacher {html.escape(str(teacher))}</p>",
        *_harvested(d),
        *_teacher(d),
        *_run(d),
        "<h2>Provenance</h2>",
        f"<pre>{html.escape(d.provenance)}</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>harvest report</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
