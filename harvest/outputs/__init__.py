"""Outputs: the commit manifest and the provenance every shard carries."""
