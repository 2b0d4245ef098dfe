"""``harvest report OUT``: one self-contained HTML page about a harvest.

What was harvested (prompts, samples, tokens, failures by class with examples, finish reasons,
response lengths), the teacher's distribution by position (sampled-token logprob, top-1
probability, top-K mass, entropy), how the last run went (throughput and latency over time and
per endpoint, retries, outages, restarts: from the status file and run log the driver writes)
and the provenance block. Charts are matplotlib SVG inlined in the page, so it opens with no
network. Everything is read through the storage layer: object-store outputs work the same.
Needs the ``report`` extra (``pip install 'teacher-harvest[report]'``).
"""

from __future__ import annotations

from pathlib import Path

from workers.storage import store_for


def write_report(out: str, dest: str | None = None) -> str:
    """Build the page for ``out`` and write it to ``dest`` (default ``OUT/report.html``, in
    the output's own store); return where it went."""
    from harvest.report.collect import collect
    from harvest.report.page import render

    html = render(collect(out)).encode()
    if dest is None:
        store_for(out).write_bytes("report.html", html)
        return store_for(out).child_uri("report.html")
    Path(dest).write_bytes(html)
    return dest
