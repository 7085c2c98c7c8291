"""Names and published values of the HeartMuLa LM checkpoint's layout (spec sections 1.1, 1.2, 1.4), torch-free.

gpu_worker/checkpoints/heartmula_checkpoint.py loads the checkpoint from them; processes that must not
start torch (the kernel warm-up's children) read the configs by the same names.
"""
from __future__ import annotations

from typing import Any

LM_FOLDER_PATTERN = "HeartMuLa-oss-*"
TOKENIZER_NAME = "tokenizer.json"
GEN_CONFIG_NAME = "gen_config.json"
CONFIG_NAME = "config.json"

# Published 3B values: the fallback for a missing config key (spec §1.2).
CONFIG_DEFAULTS: dict[str, Any] = {
    "model_type": "heartmula",
    "backbone_flavor": "llama-3B",
    "decoder_flavor": "llama-300M",
    "text_vocab_size": 128_256,
    "audio_vocab_size": 8197,
    "audio_num_codebooks": 8,
    "muq_dim": 512,
}
# The published gen_config.json (spec §1.4).
PUBLISHED_GEN_CONFIG: dict[str, int] = {"text_bos_id": 128_000, "text_eos_id": 128_001, "audio_eos_id": 8193,
                                        "empty_id": 0}
