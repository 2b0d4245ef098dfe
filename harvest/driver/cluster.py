"""Joining Ray: the cluster named by ``--ray-address`` / ``$RAY_ADDRESS``, or a private one,
with Ray's own prints kept to the debug log."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from harvest.watch.logs import event, ray_logging_level


class ClusterUnavailable(RuntimeError):
    """The Ray cluster named by --ray-address / $RAY_ADDRESS cannot be joined."""


_QUIET = "1"  # the value quiet_ray sets (a user's own setting is left alone)


def quiet_ray() -> None:
    """Keep Ray's own prints off the terminal unless ``--log-level debug``: the "Unhandled
    error" tracebacks of tasks the driver gave up on when a job stops (their failure is
    reported once, in harvest's own line) and the raylet's "(raylet) A worker died ..."
    paragraphs (a replica's death is reported by harvest's restart line). With debug they
    print as Ray prints them."""
    from ray._private import worker as ray_worker

    shown = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)
    if ray_logging_level() <= logging.DEBUG:
        ray_worker.print_to_stdstream = shown
        if os.environ.get("RAY_IGNORE_UNHANDLED_ERRORS") == _QUIET:
            del os.environ["RAY_IGNORE_UNHANDLED_ERRORS"]
        return
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", _QUIET)  # read at each unhandled error

    def to_debug_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        for line in data.get("lines", []):
            event("ray_message", f"({data.get('pid')}) {line}", logging.DEBUG)

    to_debug_log.__wrapped__ = shown  # type: ignore[attr-defined]
    # Ray's error listener thread calls the module's function by name at each message.
    ray_worker.print_to_stdstream = to_debug_log


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (as under ``ray job submit``), or start a private one."""
    quiet_ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=ray_logging_level())
        except (ConnectionError, RuntimeError) as err:
            raise ClusterUnavailable(
                f"cannot join the Ray cluster at {address} ({type(err).__name__}); if it uses "
                "token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"
            ) from None
    else:
        # Ray runs its workers at nice 15; on a machine shared with the teacher (or any other
        # busy process) that starves the harvest workers' event loops, and the teacher then
        # runs fewer requests at once (bench/README.md, "Teacher saturation").
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=ray_logging_level(),
        )
