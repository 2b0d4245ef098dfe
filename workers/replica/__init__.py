"""Managed teacher replicas: the vLLM server process and the Ray actor that owns it."""
