"""Data in: tokenizers, `gpt prepare` (text -> shards), the shard and meta.json formats."""
