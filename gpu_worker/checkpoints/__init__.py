"""Checkpoint files: loaders of the published layout, file checksums, the tiny random checkpoint and its tokenizer."""
