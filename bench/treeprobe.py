"""CPU seconds and peak RSS of one process tree, by process kind, sampled while it runs.

Used by bench/peers.py: each contender runs as a child process that starts its own Ray cluster
(if any), so everything it costs - its driver, Ray's raylet/GCS/dashboard agents, Ray workers -
is a descendant of that child, and nothing else is. A process that exits keeps its last sample.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Self

import psutil


def kind_of(proc: psutil.Process, root_pid: int) -> str:
    """driver | harvest_workers | ray_workers | ray_system, from the command line."""
    if proc.pid == root_pid:
        return "driver"
    cmd = " ".join(proc.cmdline())
    if "HarvestActor" in cmd:
        return "harvest_workers"
    if "ray::" in cmd or "default_worker.py" in cmd:
        return "ray_workers"
    return "ray_system"


def rates_between(
    samples: list[tuple[float, dict[str, float]]], t0: float, t1: float
) -> dict[str, float]:
    """Per second, how much each cumulative counter of timed ``samples`` grew between the
    first and the last sample taken within ``[t0, t1]``; empty with fewer than two there."""
    inside = [(t, values) for t, values in samples if t0 <= t <= t1]
    if len(inside) < 2:
        return {}
    (ta, a), (tb, b) = inside[0], inside[-1]
    return {k: (b[k] - a.get(k, 0.0)) / max(1e-9, tb - ta) for k in b}


class Sampler:
    """Calls ``sample()`` at ``start()``, then every ``every_s`` in a thread until ``stop()``."""

    def __init__(self, every_s: float, name: str) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def start(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class TreeProbe(Sampler):
    """Sample the tree under ``root_pid`` every ``every_s`` until ``stop()``."""

    def __init__(self, root_pid: int, every_s: float = 0.2) -> None:
        super().__init__(every_s, "tree-probe")
        self.root = psutil.Process(root_pid)
        self.cpu: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self.peak_rss: Counter[str] = Counter()  # max over samples of the kind's summed RSS
        self.peak_total_rss = 0
        self.timeline: list[tuple[float, dict[str, float]]] = []  # (monotonic, CPU-s by kind)

    def pids(self) -> list[int]:
        """Every process of the tree seen so far (for ending them after a time cap)."""
        return list(self.cpu)

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss: Counter[str] = Counter()
        for proc in procs:
            try:
                kind = self.kind.get(proc.pid)
                if kind in (None, "ray_workers"):  # a worker names its actor only once made
                    kind = kind_of(proc, self.root.pid)
                with proc.oneshot():
                    t = proc.cpu_times()
                    mem = proc.memory_info().rss
            except psutil.Error:
                continue
            self.kind[proc.pid] = kind
            self.cpu[proc.pid] = t.user + t.system  # children_*: would count the reaped twice
            rss[kind] += mem
        for kind, value in rss.items():
            self.peak_rss[kind] = max(self.peak_rss[kind], value)
        self.peak_total_rss = max(self.peak_total_rss, sum(rss.values()))
        self.timeline.append((time.monotonic(), self.cpu_by_kind()))

    def cores_between(self, t0: float, t1: float) -> dict[str, float]:
        """Mean cores used by each kind between two monotonic times."""
        return rates_between(self.timeline, t0, t1)

    def cpu_by_kind(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for pid, used in self.cpu.items():
            out[self.kind[pid]] += used
        return dict(out)
