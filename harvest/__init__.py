"""The driver: CLI, scheduler, prompt sources, manifest/resume, reader for training."""
