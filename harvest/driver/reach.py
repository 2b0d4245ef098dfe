"""Is anything listening at the teacher's endpoints? A TCP connect, before Ray starts.

A job whose every endpoint refuses connections would otherwise start Ray and its workers and
only then, after the preflight's retries, say ``unreachable``. A refused connect is certain
(no server bound the port), so it is refused at once; a timeout or a slow accept is left to the
preflight, which waits up to ``teacher.outage_timeout_s`` for a teacher still starting.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from harvest.driver.preflight import PreflightError


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


def check_listening(endpoints: list[str]) -> None:
    """Refuse a job none of whose endpoints has a server listening."""
    reasons = [(e, refused(e)) for e in endpoints]
    if endpoints and all(r is not None for _, r in reasons):
        where = "; ".join(f"{':'.join(map(str, host_port(e)))} ({r})" for e, r in reasons)
        raise PreflightError(
            f"nothing listens at {where}: start the teacher server (e.g. `vllm serve MODEL "
            "--port PORT`) or fix teacher.endpoints in the job file; "
            "`harvest validate JOB --check-teacher` checks it without starting a harvest"
        )
