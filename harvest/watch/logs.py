"""Logs worth reading: to stderr (text or JSON lines) and to ``OUT/_harvest/log.jsonl``.

What is logged: job start (the resolved spec; it holds no secret, keys live in the
environment) and end, endpoint health changes, circuit openings, Retry-After pauses, replica
restarts, and the first few failures of each error class with their message. The run log is
rewritten whole at each flush (no append needed, so it works the same on any store) and holds
every run's lines, so a finished job can be audited.

Ray's own start-up chatter stays out of the terminal unless ``--log-level debug``.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from workers.storage import store_for

LOGGER = "harvest"
RUN_LOG = "_harvest/log.jsonl"
FLUSH_EVERY_S = 5.0

log = logging.getLogger(LOGGER)


def _record_dict(record: logging.LogRecord) -> dict[str, Any]:
    out = {
        "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "event": getattr(record, "event", "message"),
        "message": record.getMessage(),
    }
    out.update(getattr(record, "fields", {}))
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(_record_dict(record), default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"harvest: {record.levelname.lower()}: {record.getMessage()}"


_stderr: logging.Handler | None = None


def configure(level: str = "info", fmt: str = "text") -> None:
    """Set up the ``harvest`` logger on stderr at ``level`` (the run log always keeps info and
    above), and quiet Ray unless asked for debug."""
    global _stderr
    wanted = logging.getLevelName(level.upper())
    log.setLevel(min(wanted, logging.INFO))
    log.propagate = False
    if _stderr is not None:
        log.removeHandler(_stderr)
    _stderr = logging.StreamHandler(sys.stderr)
    _stderr.setLevel(wanted)
    _stderr.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.addHandler(_stderr)
    logging.getLogger("ray").setLevel(ray_logging_level())


def ray_logging_level() -> int:
    """The level to hand ``ray.init``: its own handler prints INFO lines otherwise."""
    debug = _stderr is not None and _stderr.level <= logging.DEBUG
    return logging.DEBUG if debug else logging.ERROR


def event(name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured log line: ``name`` says what happened, ``fields`` the details."""
    log.log(level, message, extra={"event": name, "fields": fields})


class RunLogHandler(logging.Handler):
    """Keeps the run's lines and rewrites ``OUT/_harvest/log.jsonl`` with them."""

    def __init__(self, out_dir: str | Path) -> None:
        super().__init__(logging.INFO)
        self.store = store_for(str(out_dir))  # object stores cannot append: rewrite it whole
        try:
            self.lines = self.store.read_bytes(RUN_LOG).splitlines(keepends=True)  # earlier runs
        except FileNotFoundError:
            self.lines = []
        self._flushed = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.dumps(_record_dict(record), default=str) + b"\n")
        if time.monotonic() - self._flushed > FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self.store.write_bytes(RUN_LOG, b"".join(self.lines))
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.flush()
        super().close()


def attach_run_log(out_dir: str | Path) -> RunLogHandler:
    handler = RunLogHandler(out_dir)
    log.addHandler(handler)
    return handler


def detach_run_log(handler: RunLogHandler) -> None:
    log.removeHandler(handler)
    handler.close()
