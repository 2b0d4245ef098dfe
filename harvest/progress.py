"""Progress bar for a harvest: prompts done, tokens/s, failures, ETA (tqdm on stderr)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, done: int, *, enabled: bool = True) -> None:
        self.started = time.monotonic()
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

    def update(self, *, done: int, in_unit: int, tokens: int, failures: int) -> None:
        position = min(self.bar.total, done + max(0, in_unit))
        if position > self.bar.n:
            self.bar.update(position - self.bar.n)
        rate = tokens / max(1e-6, time.monotonic() - self.started)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s, {failures} failed", refresh=False)

    def note(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
