"""A model or adapter directory on disk (SPEC 3): its file names, weight-file hashes, `recall.json`, aux files."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from collections.abc import Collection, Mapping
from pathlib import Path

from .privacy import PRIVATE_DIR

RECALL_JSON = "recall.json"
READY = "READY"
REPORT_NAME = "recall_report.json"
PLOT_NAME = "recall_weights.png"
ADAPTER_CONFIG = "adapter_config.json"
# PEFT names its weight file `adapter_model.safetensors`; a full model's is `model.safetensors` (or shards).
ADAPTER_STEM = "adapter_model"
# Files that describe one merge or one task, never carried over into a merge's output.
NOT_COPIED = {RECALL_JSON, READY, REPORT_NAME, PLOT_NAME, "recall_samples.jsonl", "README.md"}
# A task's fingerprint (SPEC 2.7) describes that task's model, not a merge output: never carried over as is.
FINGERPRINT_NAME = "recall_fingerprint.safetensors"
NOT_COPIED |= {FINGERPRINT_NAME}
# A version carries one fingerprint per task folded into it. Fingerprints hold the token ids of typical samples
# (training text), so they live in the private folder: never in a card, a report or an upload.
FINGERPRINTS_DIR = f"{PRIVATE_DIR}/fingerprints"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_weight_file(name: str) -> bool:
    if name.startswith("recall_"):  # our own files (the fingerprint is a .safetensors) are never weights
        return False
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name.endswith(".safetensors.index.json")


def weight_file_paths(model_dir: str | Path) -> list[Path]:
    """Every weight file (and index) of a model or adapter directory, sorted by name."""
    return [p for p in sorted(Path(model_dir).iterdir()) if p.is_file() and is_weight_file(p.name)]


def weight_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every weight file (and index) in a model or adapter directory."""
    return {p.name: sha256_file(p) for p in weight_file_paths(model_dir)}


def input_weight_hashes(
    dirs: list[Path], known: Mapping[str | Path, Mapping[str, str]] | None = None
) -> dict[str, dict[str, str]]:
    """`weight_hashes` of each directory, taking those the caller already computed from `known`
    (`{directory: {file name: sha256}}`, e.g. the daemon's hashes of a drop it has just verified) so the same bytes
    are not hashed twice. A known map that does not name exactly the directory's weight files is not used."""
    given = {str(Path(k)): dict(v) for k, v in (known or {}).items()}
    out = {}
    for d in dirs:
        files = weight_file_paths(d)
        hashes = given.get(str(Path(d)))
        if not hashes or set(hashes) != {p.name for p in files}:
            hashes = {p.name: sha256_file(p) for p in files}
        out[str(d)] = {p.name: hashes[p.name] for p in files}
    return out


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_recall_json(model_dir: str | Path) -> dict:
    """The directory's `recall.json`, or `{}` when it has none."""
    path = Path(model_dir) / RECALL_JSON
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return data


def task_count(model_dir: str | Path) -> int:
    """How many tasks a model carries: `task_count` of its `recall.json`; a plain model counts 1."""
    value = read_recall_json(model_dir).get("task_count", 1)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{Path(model_dir) / RECALL_JSON}: task_count must be a non-negative integer, got {value!r}.")
    return value


def copy_aux_files(src: Path, dst: Path, skip: Collection[str] = ()) -> list[str]:
    """Copy config, tokenizer and other non-weight files of `src` into `dst`: not the task-specific recall files
    (`NOT_COPIED`), hidden files, sub-folders, or the names in `skip`.

    Only the contents of regular files are copied, as regular files: a symlink to a regular file is copied by
    content (a Hugging Face cache snapshot is made of such links), a dangling link, FIFO, socket or device is refused
    with a `ValueError` naming it, since skipping it would silently drop a tokenizer or config file and opening a FIFO
    could hang. Drops reach this only after the daemon refused every link in them (RELIABILITY 13).
    """
    copied = []
    for p in sorted(src.iterdir()):
        if p.name in NOT_COPIED or p.name in skip or p.name.startswith("."):
            continue
        try:
            mode = p.stat().st_mode  # the link's target, for a link
        except OSError:
            raise ValueError(f"{p} is a dangling link; model folders must hold plain files.") from None
        if stat.S_ISDIR(mode) or is_weight_file(p.name):
            continue
        if not stat.S_ISREG(mode):
            raise ValueError(f"{p} is not a regular file (FIFO, socket or device); model folders must hold plain "
                             "files.")
        shutil.copyfile(p, dst / p.name)  # contents only: never a link, never the source's mode bits
        copied.append(p.name)
    return copied
