"""Progress bar for a harvest: prompts done, tokens/s, failures, ETA (tqdm on stderr).

While teacher endpoints are out of rotation and rows wait for them, the bar says which and since
when, and a line is written when that starts and when it ends, also without a terminal.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from workers.router import EndpointDown


class Progress:
    def __init__(
        self, total: int, done: int, *, enabled: bool = True, outage_timeout_s: float = 600.0
    ) -> None:
        self.started = time.monotonic()
        self.outage_timeout_s = outage_timeout_s
        self.down: list[EndpointDown] = []
        self.down_since: float | None = None
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="prompt",
            desc="harvest",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def update(
        self,
        *,
        done: int,
        in_unit: int,
        tokens: int,
        failures: int,
        down: list[EndpointDown] | None = None,
    ) -> None:
        position = min(self.bar.total, done + max(0, in_unit))
        if position > self.bar.n:
            self.bar.update(position - self.bar.n)
        self._follow_outage(down or [])
        rate = tokens / max(1e-6, time.monotonic() - self.started)
        postfix = f"{rate:,.0f} tok/s, {failures} failed"
        if self.down:
            since = min(d.since for d in self.down)
            postfix += f", teacher down: {len(self.down)} endpoint(s) since " + time.strftime(
                "%H:%M:%S", time.gmtime(since)
            )
        self.bar.set_postfix_str(postfix, refresh=False)

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
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
