"""What runs inside Ray workers: teacher client, router, shard writer, harvest actor."""

__version__ = "0.1.0"
USER_AGENT = f"teacher-harvest/{__version__}"
