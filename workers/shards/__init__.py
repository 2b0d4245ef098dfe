"""Shard writing: Arrow columns from answers, row groups streamed to the store."""
