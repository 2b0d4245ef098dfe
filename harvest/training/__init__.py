"""The training side: reading shards, targets, batches, the torch dataset, inspection."""
