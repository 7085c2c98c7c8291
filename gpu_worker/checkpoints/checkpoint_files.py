"""Reading and writing the published safetensors layout (single file or sharded + index).

This module knows files, not models: it finds the weight files of one model folder, checks the
shard index, lists every tensor's name/shape/dtype, loads tensors one at a time straight to a
device and dtype, writes state dicts in either layout, and hashes files (through file_checksums). Model-specific
validation (expected names and shapes) lives next to each model and reports through
`ProblemReport`, so both models fail with the same exception type and message format.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import struct
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpu_worker.checkpoints.file_checksums import sha256_file

LOAD_THREADS = 4  # tensors copied at once by load_many (bench/lm_load.py)
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_NAMES_PER_CATEGORY = 20


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded; the message lists every problem found."""


@dataclass
class ProblemReport:
    """Collects every loading problem of one folder, then raises them as one error."""

    folder: Path
    categories: dict[str, list[str]] = field(default_factory=dict)

    def add(self, category: str, item: str) -> None:
        self.categories.setdefault(category, []).append(item)

    def extend(self, category: str, items: Iterable[str]) -> None:
        for item in items:
            self.add(category, item)

    def __bool__(self) -> bool:
        return any(self.categories.values())

    def message(self) -> str:
        lines = [f"cannot load checkpoint {self.folder}:"]
        for category, items in self.categories.items():
            if not items:
                continue
            lines.append(f"  {category} ({len(items)}):")
            lines.extend(f"    {item}" for item in items[:MAX_NAMES_PER_CATEGORY])
            if len(items) > MAX_NAMES_PER_CATEGORY:
                lines.append(f"    ... and {len(items) - MAX_NAMES_PER_CATEGORY} more")
        return "\n".join(lines)

    def raise_if_any(self) -> None:
        if self:
            raise CheckpointError(self.message())


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16"
    file: Path


_ALLOWED_FLOAT_DTYPES = {"F32", "BF16", "F16"}


class WeightFiles:
    """The weight files of one model folder, with the shard index checked."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        single_path = self.folder / SINGLE_NAME
        if index_path.exists() and single_path.exists():
            raise CheckpointError(
                f"cannot load checkpoint {self.folder}: both {INDEX_NAME} and {SINGLE_NAME} exist; "
                "keep exactly one layout"
            )
        if not index_path.exists() and not single_path.exists():
            raise CheckpointError(
                f"cannot load checkpoint {self.folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found"
            )
        self.sharded = index_path.exists()
        self.tensors: dict[str, TensorInfo] = {}
        report = ProblemReport(self.folder)
        if self.sharded:
            self._read_sharded(index_path, report)
        else:
            self._read_file(single_path, report, expected_names=None)
        report.raise_if_any()

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def _read_sharded(self, index_path: Path, report: ProblemReport) -> None:
        try:
            index = json.loads(index_path.read_text())
            weight_map: Mapping[str, str] = index["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot load checkpoint {self.folder}: bad {INDEX_NAME}: {exc}") from exc
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(name)
        for shard, names in sorted(by_shard.items()):
            path = self.folder / shard
            if Path(shard).name != shard:
                report.add("bad shard names in index", shard)
            elif not path.exists():
                report.add("missing shard files", f"{shard} (named by {INDEX_NAME} for {len(names)} tensors)")
            else:
                self._read_file(path, report, expected_names=names)

    def _read_file(self, path: Path, report: ProblemReport, expected_names: set[str] | None) -> None:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            for name in sorted(names):
                if expected_names is not None and name not in expected_names:
                    report.add("tensors in a shard but not in its index entry", f"{name} in {path.name}")
                    continue
                if name in self.tensors:
                    report.add("tensors present in two shards", f"{name}: {self.tensors[name].file.name} and {path.name}")
                    continue
                sl = handle.get_slice(name)
                self.tensors[name] = TensorInfo(name, tuple(sl.get_shape()), sl.get_dtype(), path)
        if expected_names is not None:
            for name in sorted(expected_names - names):
                report.add("tensors named by the index but absent from their shard", f"{name} (expected in {path.name})")

    def load(self, name: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """Load one tensor, cast on the host when needed, then move it: never a full fp32 copy on the GPU."""
        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def load_many(self, names: Iterable[str], *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  threads: int = LOAD_THREADS) -> dict[str, torch.Tensor]:
        """Load tensors from memory-mapped files, several at once: `load`'s values, bit for bit.

        Each tensor is a zero-copy view of its file's mapping, copied to `device` and cast there (on a GPU
        the copy carries the stored dtype and the GPU casts, with the same rounding as the host), so no
        thread holds the GIL while bytes move and one tensor at a time per thread is held twice.
        """
        wanted = [self.tensors[name] for name in names]
        target = torch.device(device)
        out: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            maps = {path: _MappedFile(path, stack) for path in {info.file for info in wanted}}

            def one(info: TensorInfo) -> tuple[str, torch.Tensor]:
                view = maps[info.file].tensor(info.name)
                cast = dtype if dtype is not None and view.is_floating_point() else view.dtype
                # always a copy: the mapping is closed when this returns
                return info.name, view.to(device=target, dtype=cast, copy=True)

            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                out.update(pool.map(one, wanted))
            if target.type == "cuda":
                torch.cuda.synchronize(target)
        return out

    def check_float_dtypes(self, report: ProblemReport, names: Iterable[str]) -> None:
        for name in names:
            info = self.tensors.get(name)
            if info is not None and info.dtype not in _ALLOWED_FLOAT_DTYPES:
                report.add("unsupported dtypes", f"{name}: {info.dtype} (expected one of F32, BF16, F16)")


class _MappedFile:
    """One safetensors file mapped copy-on-write (its pages are the page cache's; nothing is written)."""

    def __init__(self, path: Path, stack: contextlib.ExitStack):
        handle = stack.enter_context(open(path, "rb"))
        (header_len,) = struct.unpack("<Q", handle.read(8))
        self.header = json.loads(handle.read(header_len))
        self.data_start = 8 + header_len
        self.map = stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY))

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=self.data_start + begin).view(shape)


def compare_shapes(
    files: WeightFiles,
    expected: Mapping[str, tuple[int, ...]],
    report: ProblemReport,
    *,
    ignorable: Callable[[str], bool] = lambda name: False,
) -> None:
    """Report missing, unexpected and mis-shaped tensors of a folder against the model's expectation."""
    present = files.tensors
    for name in sorted(set(expected) - set(present)):
        report.add("missing tensors", f"{name}: expected {list(expected[name])}")
    for name in sorted(set(present) - set(expected)):
        if not ignorable(name):
            report.add("unexpected tensors", f"{name}: found {list(present[name].shape)}")
    for name in sorted(set(expected) & set(present)):
        if tuple(expected[name]) != present[name].shape:
            report.add("shape mismatches", f"{name}: expected {list(expected[name])} got {list(present[name].shape)}")


def write_state_dict(folder: Path | str, tensors: Mapping[str, torch.Tensor], *, shards: int = 1) -> list[Path]:
    """Write tensors as `model.safetensors` (shards=1) or as N shards plus the index file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    items = [(name, t.detach().contiguous().cpu()) for name, t in tensors.items()]
    if shards <= 1:
        path = folder / SINGLE_NAME
        save_file(dict(items), str(path), metadata=metadata)
        return [path]
    total = sum(t.numel() * t.element_size() for _, t in items)
    target = total / shards
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > target and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, tensor))
        size += nbytes
    while len(groups) < shards:  # tiny models: keep the promised shard count
        donor = max(groups, key=len)
        groups.append([donor.pop()])
    weight_map: dict[str, str] = {}
    paths = []
    for i, group in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(dict(group), str(folder / shard), metadata=metadata)
        paths.append(folder / shard)
        weight_map.update({name: shard for name, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return paths


def folder_checksums(folder: Path | str) -> dict[str, str]:
    """sha256 of every regular file directly in a folder (weights, index, config), by file name.

    One thread per file (hashlib releases the GIL on large blocks): the 3B model's four shards hash in
    about the time of one instead of ~15 s in a row.
    """
    folder = Path(folder)
    entries = [entry for entry in sorted(folder.iterdir()) if entry.is_file() and not entry.name.startswith(".")]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(entries)))) as pool:
        return dict(zip((entry.name for entry in entries), pool.map(sha256_file, entries)))


def read_json(path: Path | str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"cannot load checkpoint: {path} is missing") from exc
    except ValueError as exc:
        raise CheckpointError(f"cannot load checkpoint: {path} is not valid JSON: {exc}") from exc

