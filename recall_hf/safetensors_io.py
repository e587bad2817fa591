"""Streaming safetensors I/O: lazy reads of (sharded) checkpoints, shard-by-shard writes with the index last.

Reading parses each file's header (cheap) and checks its size against the header, so a truncated file is refused
before any work. Writing knows every tensor's name, dtype and shape up front (they come from the inputs' headers),
so it writes each shard's header first and then streams tensor bytes one tensor at a time: peak memory is one
tensor, never one shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .durable import fsync_path

WEIGHTS_NAME = "model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# float8 (FP8 releases, quantized checkpoints): readable where this torch has the dtype. Never fused (fusion.py).
FLOAT8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}
DTYPES.update({name: getattr(torch, attr) for name, attr in FLOAT8.items() if hasattr(torch, attr)})
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute position of the tensor's first byte in `file`

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        if self.dtype not in DTYPES:
            raise ValueError(f"Unsupported safetensors dtype {self.dtype!r} for {self.name!r}.")
        n = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


def read_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header and check the file holds every byte it announces."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes); re-copy it.")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path} has a corrupt or truncated safetensors header; re-copy the file.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} has an unreadable safetensors header ({err}); re-copy the file.") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path} is truncated or padded: header announces {8 + n + end} bytes, file has {size}.")
    return header


def index_shard(model_dir: Path, index: Path, name: object) -> Path:
    """The shard `name` of `index`: a relative path inside `model_dir`, no `..`, no linked folder on the way.

    The shard file itself may be a link to a regular file (a Hugging Face cache snapshot is made of links into its
    blobs); daemon drops never hold links at all (RELIABILITY 13: the daemon refuses them before any read)."""
    rel = PurePosixPath(name) if isinstance(name, str) and name and "\\" not in name else None
    if rel is None or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{index} names shard {name!r}, which is not a file name inside {model_dir}; fix the index.")
    path = model_dir / rel
    folders = [model_dir.joinpath(*rel.parts[: i + 1]) for i in range(len(rel.parts) - 1)]
    if any(f.is_symlink() for f in folders) or (path.is_symlink() and not path.is_file()):
        raise ValueError(f"{index} names shard {name!r}, a symlink or a path leaving {model_dir}; copy the real file "
                         "into the model folder.")
    return path


def safetensors_shards(model_dir: Path, stem: str = "model") -> list[Path]:
    """The safetensors files of a model dir, following `<stem>.safetensors.index.json` when present."""
    index = model_dir / f"{stem}{INDEX_SUFFIX}"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({err}).") from None
        files = sorted({index_shard(model_dir, index, f) for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index} names missing shard(s) {missing}; the checkpoint is incomplete.")
        return files
    single = model_dir / f"{stem}.safetensors"
    if single.exists():
        return [single]
    raise ValueError(f"No {stem}.safetensors or {stem}{INDEX_SUFFIX} in {model_dir}; save with safe_serialization.")


class CheckpointReader:
    """Lazy, validated view of one model's tensors; each tensor is read only when asked for."""

    def __init__(self, model_dir: str | Path, stem: str = "model"):
        self.dir = Path(model_dir)
        self.files = safetensors_shards(self.dir, stem)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            header = read_header(file)
            with open(file, "rb") as f:
                start = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, meta in header.items():
                if name in self.tensors:
                    raise ValueError(f"Tensor {name!r} appears in two shards of {self.dir}.")
                begin, end = (int(x) for x in meta["data_offsets"])
                info = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), file, start + begin)
                if info.dtype in DTYPES and end - begin != info.nbytes:
                    raise ValueError(f"{file}: tensor {name!r} spans {end - begin} bytes but its shape needs "
                                     f"{info.nbytes}; the file is corrupt.")
                self.tensors[name] = info
        index = self.dir / f"{stem}{INDEX_SUFFIX}"
        if index.exists():
            indexed = set(json.loads(index.read_text())["weight_map"])
            if indexed != set(self.tensors):
                raise ValueError(f"{index} does not match its shards' tensors; the checkpoint is inconsistent.")
        self._files: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        """One whole tensor in memory of its own."""
        return self.read_into(name, torch.empty(self.tensors[name].nbytes, dtype=torch.uint8))

    def read_into(self, name: str, buf: torch.Tensor, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Read elements `[start, start + count)` of a tensor (all by default) into the front of the uint8 tensor
        `buf`; returns a view of it (valid until `buf` is reused): the full shape for a whole tensor, else flat.
        Plain reads, no mmap: memory stays at one buffer, no page-cache pages stay mapped."""
        info = self.tensors[name]
        whole = start == 0 and count is None
        count = info.numel - start if count is None else count
        elem = DTYPES[info.dtype].itemsize
        n = count * elem
        if buf.dtype != torch.uint8 or buf.numel() < n:
            raise ValueError(f"read_into({name!r}) needs a uint8 buffer of at least {n} bytes.")
        if start < 0 or start + count > info.numel:
            raise ValueError(f"read_into({name!r}): elements [{start}, {start + count}) outside {info.numel}.")
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb", buffering=0)
        view = memoryview(buf.numpy())[:n]
        f.seek(info.offset + start * elem)
        done = 0
        while done < n:
            got = f.readinto(view[done:])
            if not got:
                raise ValueError(f"{info.file} ended while reading {name!r}; re-copy the file.")
            done += got
        flat = buf[:n].view(DTYPES[info.dtype])
        return flat.view(info.shape) if whole else flat

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def plan_shards(infos: list[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Split tensors (in order) into shards of at most `max_shard_size` bytes (a bigger tensor gets its own).

    Each `TensorInfo.dtype` must be the dtype the tensor is written in.
    """
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def _encode_header(shard: list[TensorInfo]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in shard:
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


class StreamingWriter:
    """Writes tensors in a fixed order into sharded safetensors, one tensor in memory at a time.

    Args:
        out_dir: existing directory (a staging dir; the caller renames it into place).
        infos: every output tensor in write order (names and shapes).
        dtypes: safetensors dtype name per tensor (the output dtype).
        max_shard_size: bytes per shard at most.
        stem: file stem (`model` or `adapter_model`).
    """

    def __init__(
        self, out_dir: Path, infos: list[TensorInfo], dtypes: dict[str, str], max_shard_size: int, stem: str = "model"
    ):
        self.out_dir, self.stem, self.dtypes = Path(out_dir), stem, dtypes
        unknown = sorted({d for d in dtypes.values() if d not in DTYPES})
        if unknown:
            raise ValueError(f"Cannot write safetensors dtype(s) {unknown}; supported: {', '.join(DTYPES)}.")
        written = [TensorInfo(i.name, dtypes[i.name], i.shape, i.file) for i in infos]
        self.shards = plan_shards(written, max_shard_size)
        n = len(self.shards)
        self.names = (
            [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.order: Iterator[tuple[int, TensorInfo]] = ((i, t) for i, s in enumerate(self.shards) for t in s)
        self._file = None
        self._shard = -1
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Write the next tensor: a whole tensor, or an iterable of flat chunks that together make it (in order)."""
        shard, info = next(self.order)
        if info.name != name:
            raise RuntimeError(f"StreamingWriter expected tensor {info.name!r} next, got {name!r}.")
        planned = TensorInfo(name, self.dtypes[name], info.shape, info.file)
        if isinstance(tensor, torch.Tensor):
            if tuple(tensor.shape) != info.shape:
                raise RuntimeError(f"Tensor {name!r} has shape {tuple(tensor.shape)}, planned {info.shape}.")
            chunks: Iterable[torch.Tensor] = (tensor,)
        else:
            chunks = tensor
        if shard != self._shard:
            self._close_file()
            self._shard = shard
            self._file = open(self.out_dir / self.names[shard], "wb")
            self._file.write(_encode_header(self.shards[shard]))
        written = 0
        for chunk in chunks:
            if DTYPE_NAMES.get(chunk.dtype) != self.dtypes[name]:
                raise RuntimeError(f"Tensor {name!r} is {chunk.dtype}, planned {self.dtypes[name]}.")
            data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.write(memoryview(data))
            written += data.nbytes
        if written != planned.nbytes:
            raise RuntimeError(f"Tensor {name!r}: wrote {written} bytes, planned {planned.nbytes}.")
        self.bytes_written += written

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> list[Path]:
        """Close the last shard, check nothing is missing, write the index (last) when sharded."""
        left = next(self.order, None)
        if left is not None:
            raise RuntimeError(f"StreamingWriter finished before tensor {left[1].name!r} was written.")
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s}
            index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
            path = self.out_dir / f"{self.stem}{INDEX_SUFFIX}"
            path.write_text(json.dumps(index, indent=2))
            fsync_path(path)
        return [self.out_dir / n for n in self.names]

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
