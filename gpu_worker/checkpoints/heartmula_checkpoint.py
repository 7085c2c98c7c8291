"""Loading (and writing tiny test copies of) the published HeartMuLa checkpoint folder (spec §1, §10).

    <ckpt_root>/HeartMuLa-oss-*/   config.json, model.safetensors.index.json, model-0000k-of-0000n.safetensors
    <ckpt_root>/tokenizer.json
    <ckpt_root>/gen_config.json

The model is built on the `meta` device, its state-dict names and shapes are compared with the
files (every problem reported in one CheckpointError), and tensors are then loaded one at a time
straight into the target dtype and device, so no fp32 copy of the model ever sits on the GPU.
"""
from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from gpu_worker.checkpoints.checkpoint_files import (
    CheckpointError,
    ProblemReport,
    WeightFiles,
    compare_shapes,
    folder_checksums,
    read_json,
    sha256_file,
    write_state_dict,
)
from gpu_worker.checkpoints.lm_layout import (  # noqa: F401  (names of the layout, re-exported)
    CONFIG_DEFAULTS,
    CONFIG_NAME,
    GEN_CONFIG_NAME,
    LM_FOLDER_PATTERN,
    TOKENIZER_NAME,
)
from gpu_worker.checkpoints.synthetic_tokenizer import BOS_ID, EOS_ID, write_synthetic_tokenizer
from gpu_worker.model.heartmula import FlavorError, HeartMuLa, HeartMuLaArgs
from gpu_worker.model.meta_build import meta_modules
from gpu_worker.model.prompt import GenConfig
from gpu_worker.model.token_validation import CODEBOOK_SIZE

logger = logging.getLogger(__name__)

_BOOKKEEPING_KEYS = {"flavors", "torch_dtype", "dtype", "architectures", "transformers_version"}
_SIZE_KEYS = ("text_vocab_size", "audio_vocab_size", "audio_num_codebooks", "muq_dim")
_GEN_CONFIG_KEYS = ("text_bos_id", "text_eos_id", "audio_eos_id", "empty_id")
# written by a reference model saved after its caches were set up; never "unexpected"
_IGNORABLE_NAMES = {"backbone_causal_mask", "decoder_causal_mask"}


@dataclass
class LoadedLM:
    model: HeartMuLa
    tokenizer: Tokenizer
    gen_config: GenConfig
    config: dict
    checksums: dict[str, str]  # path relative to ckpt_root -> sha256


def find_lm_folder(ckpt_root: Path, lm_folder: str | None = None) -> Path:
    if lm_folder is not None:
        folder = ckpt_root / lm_folder
        if not folder.is_dir():
            raise CheckpointError(f"cannot load checkpoint: LM folder {folder} does not exist")
        return folder
    candidates = sorted(p for p in ckpt_root.glob(LM_FOLDER_PATTERN) if p.is_dir())
    if len(candidates) != 1:
        found = [p.name for p in candidates] or "none"
        raise CheckpointError(f"cannot load checkpoint {ckpt_root}: expected exactly one {LM_FOLDER_PATTERN} "
                              f"folder, found {found}; pass lm_folder to choose")
    return candidates[0]


def read_lm_config(folder: Path) -> tuple[dict, HeartMuLaArgs]:
    """The LM folder's config.json and the model arguments it defines (CheckpointError if malformed)."""
    path = folder / CONFIG_NAME
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"cannot load checkpoint: {path} must hold a JSON object")
    return config, heartmula_args_from_config(config, path)


def parse_gen_config(path: Path) -> GenConfig:
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot load checkpoint: {path} must hold a JSON object")
    missing = [key for key in _GEN_CONFIG_KEYS if key not in data]
    unknown = sorted(set(data) - set(_GEN_CONFIG_KEYS))
    not_int = [key for key in _GEN_CONFIG_KEYS if key in data and not _is_int(data[key])]
    if missing or unknown or not_int:
        raise CheckpointError(f"cannot load checkpoint: {path}: missing keys {missing}, unknown keys {unknown}, "
                              f"non-integer values {not_int} (expected exactly {list(_GEN_CONFIG_KEYS)})")
    return GenConfig(**{key: data[key] for key in _GEN_CONFIG_KEYS})


def heartmula_args_from_config(config: dict, path: Path) -> HeartMuLaArgs:
    """Model arguments from `config.json`; a missing key falls back to the 3B value with a warning."""
    values = {}
    for key, default in CONFIG_DEFAULTS.items():
        if key not in config:
            logger.warning("%s has no %r; using the published 3B value %r", path, key, default)
        values[key] = config.get(key, default)
    for key in sorted(set(config) - set(CONFIG_DEFAULTS) - _BOOKKEEPING_KEYS):
        logger.debug("%s: ignoring unknown key %r", path, key)
    if values["model_type"] != "heartmula":
        raise CheckpointError(f"cannot load checkpoint: {path}: model_type is {values['model_type']!r}, "
                              "expected 'heartmula'")
    bad = [key for key in _SIZE_KEYS if not _is_int(values[key]) or values[key] < 1]
    if bad:
        raise CheckpointError(f"cannot load checkpoint: {path}: {', '.join(f'{k} = {values[k]!r}' for k in bad)} "
                              "must be positive integers")
    try:
        return HeartMuLaArgs.from_flavors(values["backbone_flavor"], values["decoder_flavor"], config.get("flavors"),
                                          **{key: values[key] for key in _SIZE_KEYS})
    except FlavorError as exc:
        raise CheckpointError(f"cannot load checkpoint: {path}: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_contradictions(args: HeartMuLaArgs, config: dict, files: WeightFiles) -> list[str]:
    """Config values that a tensor shape contradicts, so the cause is named, not just its symptoms."""
    shapes = {name: info.shape for name, info in files.tensors.items()}
    checks = [  # (config key, its value, tensor, dim, the size that value implies)
        ("text_vocab_size", args.text_vocab_size, "text_embeddings.weight", 0, args.text_vocab_size),
        ("audio_vocab_size", args.audio_vocab_size, "codebook0_head.weight", 0, args.audio_vocab_size),
        ("audio_vocab_size", args.audio_vocab_size, "audio_head", 2, args.audio_vocab_size),
        ("audio_num_codebooks", args.audio_num_codebooks, "audio_head", 0, args.audio_num_codebooks - 1),
        ("muq_dim", args.muq_dim, "muq_linear.weight", 1, args.muq_dim),
        ("backbone_flavor", config.get("backbone_flavor", CONFIG_DEFAULTS["backbone_flavor"]),
         "text_embeddings.weight", 1, args.backbone.embed_dim),
        ("decoder_flavor", config.get("decoder_flavor", CONFIG_DEFAULTS["decoder_flavor"]),
         "projection.weight", 0, args.decoder.embed_dim),
    ]
    problems = []
    for key, value, name, dim, implied in checks:
        shape = shapes.get(name)
        if shape is not None and len(shape) > dim and shape[dim] != implied:
            problems.append(f"{key} = {value!r} implies {name} dim {dim} = {implied}, got {list(shape)}")
    for stack, flavor_key, stack_args in (("backbone", "backbone_flavor", args.backbone),
                                          ("decoder", "decoder_flavor", args.decoder)):
        layers = {int(m.group(1)) for name in shapes if (m := re.match(rf"{stack}\.layers\.(\d+)\.", name))}
        if layers and len(layers) != stack_args.num_layers:
            problems.append(f"{flavor_key} = {config.get(flavor_key, CONFIG_DEFAULTS[flavor_key])!r} has "
                            f"{stack_args.num_layers} layers, the files hold {len(layers)}")
    return problems


def _special_id_problems(args: HeartMuLaArgs, gen_config: GenConfig, tokenizer: Tokenizer) -> list[str]:
    problems = []
    for key in ("text_bos_id", "text_eos_id"):
        value = getattr(gen_config, key)
        if not 0 <= value < args.text_vocab_size:
            problems.append(f"gen_config {key} = {value} is outside the text vocabulary 0..{args.text_vocab_size - 1}")
        elif tokenizer.id_to_token(value) is None:
            problems.append(f"gen_config {key} = {value} is not a token of {TOKENIZER_NAME}")
    if not CODEBOOK_SIZE <= gen_config.audio_eos_id < args.audio_vocab_size:
        problems.append(f"gen_config audio_eos_id = {gen_config.audio_eos_id} must be a special audio id in "
                        f"{CODEBOOK_SIZE}..{args.audio_vocab_size - 1}")
    if not 0 <= gen_config.empty_id < min(args.text_vocab_size, args.audio_vocab_size):
        problems.append(f"gen_config empty_id = {gen_config.empty_id} is not a valid text and audio id")
    if tokenizer.get_vocab_size() > args.text_vocab_size:
        problems.append(f"{TOKENIZER_NAME} has {tokenizer.get_vocab_size()} tokens, more than "
                        f"text_vocab_size {args.text_vocab_size}")
    return problems


def expected_shapes(args: HeartMuLaArgs) -> dict[str, tuple[int, ...]]:
    with meta_modules():
        model = HeartMuLa(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_heartmula(ckpt_root: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   lm_folder: str | None = None) -> LoadedLM:
    root = Path(ckpt_root)
    folder = find_lm_folder(root, lm_folder)
    config, args = read_lm_config(folder)
    gen_config = parse_gen_config(root / GEN_CONFIG_NAME)
    try:
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_NAME))
    except Exception as exc:  # the tokenizers library raises a bare Exception for missing/bad files
        raise CheckpointError(f"cannot load checkpoint: {root / TOKENIZER_NAME}: {exc}") from exc

    files = WeightFiles(folder)
    with meta_modules():
        model = HeartMuLa(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    report = ProblemReport(folder)
    compare_shapes(files, expected, report, ignorable=lambda name: name in _IGNORABLE_NAMES)
    files.check_float_dtypes(report, expected)
    report.extend("config values contradicted by tensor shapes", _config_contradictions(args, config, files))
    report.extend("special ids", _special_id_problems(args, gen_config, tokenizer))
    report.raise_if_any()

    with ThreadPoolExecutor(max_workers=1) as pool:  # hash the files (for the record) while loading them
        digests = pool.submit(folder_checksums, folder)
        state = files.load_many(expected, device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.requires_grad_(False).eval()
        model.fuse_projections()  # at load time: the first song pays no concatenation
        checksums = {f"{folder.name}/{name}": digest for name, digest in digests.result().items()}
    checksums[TOKENIZER_NAME] = sha256_file(root / TOKENIZER_NAME)
    checksums[GEN_CONFIG_NAME] = sha256_file(root / GEN_CONFIG_NAME)
    return LoadedLM(model=model, tokenizer=tokenizer, gen_config=gen_config, config=config, checksums=checksums)


# ---- tiny checkpoints for tests (spec §10) ----

TINY_LM_FOLDER = "HeartMuLa-oss-3B"  # the published name, so tiny and real take the same path
TINY_FLAVORS = {
    "tiny-backbone": {"num_layers": 2, "num_heads": 6, "num_kv_heads": 2, "embed_dim": 48, "intermediate_dim": 128,
                      "max_seq_len": 256, "norm_eps": 1e-5, "rope_base": 500000.0, "rope_scale_factor": 32.0},
    "tiny-decoder": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "intermediate_dim": 64,
                     "max_seq_len": 16, "norm_eps": 1e-5, "rope_base": 500000.0, "rope_scale_factor": 32.0},
}
TINY_CONFIG = {
    "model_type": "heartmula",
    "backbone_flavor": "tiny-backbone",
    "decoder_flavor": "tiny-decoder",
    "text_vocab_size": 384,
    "audio_vocab_size": 8197,
    "audio_num_codebooks": 8,
    "muq_dim": 16,
    "flavors": TINY_FLAVORS,
    "torch_dtype": "float32",
    "architectures": ["HeartMuLa"],
}
TINY_GEN_CONFIG = {"text_bos_id": BOS_ID, "text_eos_id": EOS_ID, "audio_eos_id": 8193, "empty_id": 0}


def random_state_dict(args: HeartMuLaArgs, *, seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights: norm scales 1, everything else N(0, 0.02^2), drawn in state-dict order."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith(".scale"):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    return state


def tiny_state_dict(args: HeartMuLaArgs, *, seed: int) -> dict[str, torch.Tensor]:
    """The tiny checkpoint's weights: random, except zero head rows for end-of-audio.

    Its logit is then exactly 0, far below the top-k cut of the random logits, so a tiny model never
    ends a demo or test song early by chance. EOS handling itself is tested with injected logits
    (tests/test_generate.py), not by luck.
    """
    state = random_state_dict(args, seed=seed)
    eos = TINY_GEN_CONFIG["audio_eos_id"]
    state["codebook0_head.weight"][eos] = 0.0
    state["audio_head"][:, :, eos] = 0.0
    return state


def write_tiny_heartmula(ckpt_root: Path | str, *, seed: int = 0) -> None:
    root = Path(ckpt_root)
    folder = root / TINY_LM_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(TINY_CONFIG, indent=2))
    args = heartmula_args_from_config(TINY_CONFIG, folder / CONFIG_NAME)
    write_state_dict(folder, tiny_state_dict(args, seed=seed), shards=2)
    write_synthetic_tokenizer(root / TOKENIZER_NAME)
    (root / GEN_CONFIG_NAME).write_text(json.dumps(TINY_GEN_CONFIG))


# Tensors the broken variants tamper with; chosen from different parts of the model.
