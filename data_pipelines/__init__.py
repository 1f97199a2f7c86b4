"""Offline data preparation: corpora from source trees, tokenizer training (later: shards, synthetic task makers)."""
