"""The transformer flavours of HeartMuLa (spec section 2.1), without torch.

The web tier reads a checkpoint's context length (max_seq_len) from here to refuse songs that
cannot fit, so a web host needs neither torch nor a GPU; gpu_worker.model.heartmula builds the model
from the same table.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class FlavorError(ValueError):
    """A transformer flavour that is unknown, malformed or redefines a built-in one."""


@dataclass(frozen=True)
class TransformerArgs:
    """One transformer stack (a "flavour" of spec §2.1)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scale_factor: float = 32.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise FlavorError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise FlavorError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise FlavorError(f"head_dim {self.head_dim} must be even for interleaved RoPE pairs")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


FLAVORS: dict[str, TransformerArgs] = {
    "llama-3B": TransformerArgs(num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072,
                                intermediate_dim=8192, max_seq_len=8192),
    "llama-300M": TransformerArgs(num_layers=3, num_heads=8, num_kv_heads=4, embed_dim=3072,
                                  intermediate_dim=8192, max_seq_len=2048),
    "llama-7B": TransformerArgs(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                                intermediate_dim=14336, max_seq_len=8192),
    "llama-400M": TransformerArgs(num_layers=4, num_heads=8, num_kv_heads=4, embed_dim=3072,
                                  intermediate_dim=8192, max_seq_len=2048),
}

_FLAVOR_FIELDS = {f.name for f in fields(TransformerArgs)}


def resolve_flavors(custom: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, TransformerArgs]:
    """The built-in flavours plus the custom ones of a config's `flavors` entry (spec §10).

    A custom entry may repeat a built-in name only with identical values: a silent redefinition
    would let a tiny config change what "llama-3B" means.
    """
    if custom is not None and not isinstance(custom, Mapping):
        raise FlavorError(f"flavors must be an object mapping names to flavours, got {type(custom).__name__}")
    table = dict(FLAVORS)
    for name, spec in (custom or {}).items():
        if not isinstance(spec, Mapping):
            raise FlavorError(f"flavour {name!r} must be an object of {sorted(_FLAVOR_FIELDS)}")
        unknown = set(spec) - _FLAVOR_FIELDS
        missing = {"num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len"} - set(spec)
        if unknown or missing:
            raise FlavorError(f"flavour {name!r}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
        try:
            args = TransformerArgs(**spec)
        except TypeError as exc:
            raise FlavorError(f"flavour {name!r}: {exc}") from exc
        if name in FLAVORS and FLAVORS[name] != args:
            raise FlavorError(
                f"flavour {name!r} redefines a built-in flavour differently; built-in names: {sorted(FLAVORS)}")
        table[name] = args
    return table


def flavor_args(name: str, custom: Mapping[str, Mapping[str, Any]] | None = None) -> TransformerArgs:
    table = resolve_flavors(custom)
    if name not in table:
        raise FlavorError(f"unknown flavour {name!r}; known flavours: {sorted(table)}")
    return table[name]
