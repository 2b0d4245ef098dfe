"""Is anything listening at the teacher's endpoints? A TCP connect, before Ray starts.

A job whose every endpoint refuses connections would otherwise start Ray and its workers and
only then, after the preflight's retries, say ``unreachable``. A refused connect is certain
(no server bound the port): ``harvest validate --check-teacher`` refuses it at once, and
``harvest run`` says it at once, with what to do, before Ray starts; the run itself then waits
up to ``teacher.outage_timeout_s`` (a teacher may be restarting) and stops with one line. A
timeout or a slow accept is left to the preflight.
"""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlsplit

from harvest.driver.preflight import PreflightError
from harvest.watch.logs import event


def host_port(endpoint: str) -> tuple[str, int]:
    url = urlsplit(endpoint)
    return url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)


def refused(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """Why nothing takes connections at ``endpoint`` (None: something does, or may)."""
    host, port = host_port(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except socket.gaierror as err:
        return f"unknown host ({err.strerror})"
    except OSError:
        return None  # a timeout or a route problem: the preflight waits and says more


def nothing_listening(endpoints: list[str]) -> str | None:
    """What to tell the user when none of ``endpoints`` has a server listening (else None)."""
    reasons = [(e, refused(e)) for e in endpoints]
    if not endpoints or any(r is None for _, r in reasons):
        return None
    where = "; ".join(f"{':'.join(map(str, host_port(e)))} ({r})" for e, r in reasons)
    return (
        f"nothing listens at {where}: start the teacher server (e.g. `vllm serve MODEL "
        "--port PORT`) or fix teacher.endpoints in the job file"
    )


def check_listening(endpoints: list[str]) -> None:
    """Refuse a job none of whose endpoints has a server listening."""
    if (what := nothing_listening(endpoints)) is not None:
        raise PreflightError(
            f"{what}; `harvest validate JOB --check-teacher` checks it without starting a harvest"
        )


def warn_if_nothing_listens(endpoints: list[str], outage_s: float) -> None:
    """Say at once, before Ray starts, that no endpoint takes connections, and what happens."""
    if (what := nothing_listening(endpoints)) is not None:
        event(
            "teacher_not_listening",
            f"{what}; waiting up to {outage_s:g} s for it (teacher.outage_timeout_s), "
            "Ctrl-C stops now",
            logging.WARNING,
            endpoints=endpoints,
        )
