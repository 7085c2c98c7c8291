"""The fast codec decoder (compiled, bf16)."""
