"""Task checkpoints and model directories on disk (SPEC 3): hashes, `recall.json`, staged atomic directories."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

RECALL_JSON = "recall.json"
READY = "READY"
REPORT_NAME = "recall_report.json"
PLOT_NAME = "recall_weights.png"
ADAPTER_CONFIG = "adapter_config.json"
# Files that describe one merge or one task, never carried over into a merge's output.
NOT_COPIED = {RECALL_JSON, READY, REPORT_NAME, PLOT_NAME, "recall_samples.jsonl", "README.md"}
# A task's fingerprint (SPEC 2.7) describes that task's model, not a merge output: never carried over as is.
NOT_COPIED |= {"recall_fingerprint.safetensors"}


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


def weight_files(model_dir: str | Path) -> list[Path]:
    """Every weight file (and index) of a model or adapter directory, sorted by name."""
    return [p for p in sorted(Path(model_dir).iterdir()) if p.is_file() and is_weight_file(p.name)]


def weight_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every weight file (and index) in a model or adapter directory."""
    return {p.name: sha256_file(p) for p in weight_files(model_dir)}


def input_weight_hashes(
    dirs: list[Path], known: Mapping[str | Path, Mapping[str, str]] | None = None
) -> dict[str, dict[str, str]]:
    """`weight_hashes` of each directory, taking those the caller already computed from `known`
    (`{directory: {file name: sha256}}`, e.g. the daemon's hashes of a drop it has just verified) so the same bytes
    are not hashed twice. A known map that does not name exactly the directory's weight files is not used."""
    given = {str(Path(k)): dict(v) for k, v in (known or {}).items()}
    out = {}
    for d in dirs:
        files = weight_files(d)
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


def write_json(path: Path, data: dict) -> None:
    """Write JSON durably: temp file, fsync, atomic replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory's fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give every file and directory under `path` (and `path`) the mode a plain `open`/`mkdir` would: transformers
    writes weights 0600, so a daemon or server running as another user could not read them otherwise."""
    mask = current_umask()
    for p in [path, *path.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"Output {out_dir} already exists and is not empty; choose a new --out directory.")


@contextlib.contextmanager
def staged_dir(
    final: str | Path, hidden: bool = False, seal: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Build a directory at `<final>.tmp-<pid>` and rename it to `final` only if the block succeeds.

    On any error the staging directory is removed and `final` is left as it was (absent). The files are fsynced
    before the rename and the parent after it, so a crash leaves either nothing or the complete directory. Modes
    follow the umask (`apply_umask`), so other users (the daemon's, a server's) can read what it holds.

    Args:
        final: the directory to create (must not exist, or be empty).
        hidden: name the stage `.<final>.tmp-<pid>`, so a watcher of the parent never takes it for a drop.
        seal: called on the stage after its files are fsynced and before the rename (e.g. to write `READY` last).
    """
    final = Path(final)
    check_output_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.with_name(f"{'.' if hidden else ''}{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        apply_umask(stage)
        fsync_tree(stage)
        if seal is not None:
            seal(stage)
        if final.exists():
            final.rmdir()  # empty (checked above)
        os.rename(stage, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of `src` into `dst` (not task-specific recall files)."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not is_weight_file(p.name) and p.name not in NOT_COPIED and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied
