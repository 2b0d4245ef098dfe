"""The report's charts: matplotlib figures rendered to inline SVG (no network, no files)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to SVG only
import matplotlib.pyplot as plt
import numpy as np

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def svg(draw: Callable[[Any], None], size: tuple[float, float] = (6.4, 3.0)) -> str:
    """Draw on a fresh axes and return the figure as an ``<svg>`` element."""
    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    finally:
        plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def histogram(values: np.ndarray, xlabel: str, cap: int | None = None) -> str:
    def draw(ax: Any) -> None:
        if len(values):
            hi = int(values.max()) if cap is None else min(int(values.max()), cap)
            bins = np.arange(int(values.min()), hi + 2) if hi - values.min() < 60 else 40
            ax.hist(values, bins=bins, color=COLOURS[0])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples")

    return svg(draw)


def bars(counts: dict[str, int], ylabel: str) -> str:
    def draw(ax: Any) -> None:
        names = list(counts)
        ax.bar(names, [counts[n] for n in names], color=COLOURS[: len(names)] or COLOURS[0])
        ax.set_ylabel(ylabel)

    return svg(draw)


def by_position(pos: np.ndarray, means: dict[str, np.ndarray]) -> str:
    labels = {"logprob": "sampled-token logprob", "top1": "top-1 probability",
              "mass": "top-K mass", "entropy": "entropy (nats, top-K + tail)"}  # fmt: skip

    def draw(ax: Any) -> None:
        for colour, (key, label) in zip(COLOURS, labels.items(), strict=False):
            ax.plot(pos, means[key], label=label, color=colour, linewidth=1.5)
        ax.set_xlabel("response position (token)")
        ax.legend(fontsize=7)

    return svg(draw, (6.4, 3.4))


def over_time(history: list[dict[str, Any]]) -> str:
    """Tokens/s between heartbeats, and latency percentiles, over the last run."""

    def draw(ax: Any) -> None:
        if len(history) >= 2:
            t = np.array([h["t"] for h in history])
            tok = np.array([h["tokens"] for h in history], dtype=float)
            rel = t - t[0]
            rate = np.diff(tok) / np.maximum(np.diff(t), 1e-6)
            ax.plot(rel[1:], rate, color=COLOURS[0], label="tokens/s")
            ax.set_ylabel("tokens/s")
            lat = ax.twinx()
            for colour, q in zip(COLOURS[1:], ("p50", "p90"), strict=False):
                lat.plot(rel, [h.get(q) or np.nan for h in history], color=colour,
                         linestyle="--", label=f"latency {q}")  # fmt: skip
            lat.set_ylabel("latency (s, bucket bound)")
            lat.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("seconds since the run started")

    return svg(draw)


def per_endpoint_over_time(history: list[dict[str, Any]]) -> str:
    def draw(ax: Any) -> None:
        if len(history) >= 2:
            t = np.array([h["t"] for h in history])
            endpoints = sorted({e for h in history for e in h.get("ok", {})})
            for colour, e in zip(COLOURS, endpoints, strict=False):
                ok = np.array([h.get("ok", {}).get(e, 0) for h in history], dtype=float)
                ax.plot(t[1:] - t[0], np.diff(ok) / np.maximum(np.diff(t), 1e-6), label=e,
                        color=colour)  # fmt: skip
            ax.legend(fontsize=7)
        ax.set_xlabel("seconds since the run started")
        ax.set_ylabel("answered requests/s")

    return svg(draw)


def latency_by_endpoint(latency: dict[str, np.ndarray]) -> str:
    def draw(ax: Any) -> None:
        names = sorted(latency)
        if names:
            ax.boxplot([latency[n] / 1000.0 for n in names], showfliers=False)
            ax.set_xticks(range(1, len(names) + 1), names, fontsize=7)
        ax.set_ylabel("request latency (s)")

    return svg(draw)
