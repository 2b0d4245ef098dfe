"""``RunOptions``: how ``harvest run`` / ``retry-failed`` behave, apart from the job spec (no
Ray here: the CLI builds it before Ray is imported)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    """How a run behaves, apart from what it harvests (that is the job spec's)."""

    ray_address: str | None = None  # join this cluster; else $RAY_ADDRESS, else a private one
    show_progress: bool = True  # the progress bar (lines instead when not on a terminal)
    status_every_s: float = 5.0  # status.json and progress lines
    stop_deadline_s: float = 60.0  # after SIGINT/SIGTERM, how long units in flight may finish
