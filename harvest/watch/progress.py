"""Progress of a harvest on stderr: a tqdm bar on a terminal, compact lines elsewhere.

Rows count as their answers arrive (not only when a unit commits). The bar shows tokens/s,
requests in flight, retries, failures and endpoints down; when stderr is not a terminal (a Ray
job log, a pipe) one status line is printed every ``every_s`` seconds instead. While teacher
endpoints are out of rotation and rows wait for them, a line says which and since when, and
another when they answer again.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from workers.teacher.router import EndpointDown


class Progress:
    def __init__(
        self,
        total: int,
        done: int,
        *,
        enabled: bool = True,
        outage_timeout_s: float = 600.0,
        every_s: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.outage_timeout_s = outage_timeout_s
        self.total = total
        self.down: list[EndpointDown] = []
        self.down_since: float | None = None
        self.lines = enabled and not self.stream.isatty()  # periodic lines instead of a bar
        self.every_s = every_s
        self._printed = time.monotonic()
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="prompt",
            desc="harvest",
            disable=not enabled or self.lines,
            file=self.stream,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.done = done

    def update(
        self,
        *,
        done: int,
        tokens: int,
        failures: int,
        retries: int = 0,
        in_flight: int = 0,
        down: list[EndpointDown] | None = None,
    ) -> None:
        self.done = max(self.done, min(self.total, done))
        if self.done > self.bar.n:
            self.bar.update(self.done - self.bar.n)
        self._follow_outage(down or [])
        rate = tokens / max(1e-6, time.monotonic() - self.started)
        summary = f"{rate:,.0f} tok/s, {in_flight} in flight, {retries} retries, {failures} failed"
        if self.down:
            since = time.strftime("%H:%M:%S", time.gmtime(min(d.since for d in self.down)))
            summary += f", {len(self.down)} endpoint(s) down since {since} UTC"
        self.bar.set_postfix_str(summary, refresh=False)
        if self.lines and time.monotonic() - self._printed >= self.every_s:
            self.line(summary)

    def line(self, summary: str) -> None:
        """One compact status line (for logs, where a bar would be noise)."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.note(f"harvest: {self.done}/{self.total} prompts ({pct:.1f}%), {summary}")
        self._printed = time.monotonic()

    def _follow_outage(self, down: list[EndpointDown]) -> None:
        """Say when rows start waiting for the teacher, and when it answers again."""
        if down and not self.down:
            self.down_since = time.monotonic()
            self.note(
                "teacher unavailable, rows wait (not failed): "
                + "; ".join(d.describe() for d in down)
                + f". The job stops if no endpoint answers for {self.outage_timeout_s:g} s "
                "(teacher.outage_timeout_s)."
            )
        elif self.down and not down and self.down_since is not None:
            self.note(f"teacher answers again after {time.monotonic() - self.down_since:.0f} s")
        self.down = down

    def note(self, message: str) -> None:
        self.bar.write(message, file=self.stream)

    def close(self) -> None:
        self.bar.close()
