"""Watching a job: monitor, progress, status file, run log, cluster metrics."""
