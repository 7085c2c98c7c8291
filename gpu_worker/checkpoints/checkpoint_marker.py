"""The file that marks a tiny random-weight checkpoint; torch-free so the web tier can read it."""
MARKER = "TINY_RANDOM_CHECKPOINT.txt"
