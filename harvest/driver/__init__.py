"""The driver: scheduler, worker pool, output lease, preflight, managed replicas."""
