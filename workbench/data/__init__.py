"""Runtime data: the tokenizer wrapper, the global data cursor, packing and collation."""
