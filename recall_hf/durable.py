"""Durable file-system writes: fsync helpers, umask-respecting modes, and `staged_dir` (build, fsync, rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


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


