"""The stop deadline's last resort: once a stop is asked for, the driver process ends in time.

A graceful stop (SIGINT/SIGTERM) lets the units in flight finish for ``stop_deadline_s``, then
the driver shuts its workers down and exits. If anything on that way blocks (a Ray call to a
cluster that died with the signal: a signal to the whole process group also stops the private
cluster's own processes, and the driver then waited a minute on the GCS and hung), this timer
ends the process ``SHUTDOWN_GRACE_S`` after the deadline, with the interrupted exit code and
one line. Committed shards are safe at any point (``harvest.manifest``); a rerun resumes.
"""

from __future__ import annotations

import os
import sys
import threading

SHUTDOWN_GRACE_S = 20.0  # after the stop deadline: shutting workers down, the summary, Ray's exit
EXIT_INTERRUPTED = 130

_timer: threading.Timer | None = None


def arm(stop_deadline_s: float) -> None:
    """Start the timer at the first stop request (a second one changes nothing)."""
    global _timer
    if _timer is None:
        after = stop_deadline_s + SHUTDOWN_GRACE_S
        _timer = threading.Timer(after, _expire, args=(after,))
        _timer.daemon = True
        _timer.start()


def disarm() -> None:
    """The run ended in this process and the caller goes on (``harvest.cli.main`` in-process)."""
    global _timer
    if _timer is not None:
        _timer.cancel()
        _timer = None


def _expire(after: float) -> None:
    sys.stderr.write(
        f"harvest: error: still not stopped {after:g} s after the stop signal; exiting now. "
        "Committed shards are kept; rerun the same command to resume.\n"
    )
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)
