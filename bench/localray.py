"""The private local Ray cluster of one benchmark child process.

On a loaded 2-core machine Ray's node sometimes times out while starting; one more try is
what the tests' fixture does too, so one slow start does not lose a whole study.
"""

from __future__ import annotations


def start_local_ray(attempts: int = 2) -> None:
    import ray

    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
