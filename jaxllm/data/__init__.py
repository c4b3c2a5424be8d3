"""Data: the built-in synthetic corpus, tokenizers, readers and the grain pipeline."""
