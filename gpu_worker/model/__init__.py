"""The models exactly as the spec gives them: HeartMuLa, HeartCodec, the prompt, token codes, flavors (torch-free)."""
