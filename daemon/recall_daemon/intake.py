"""A drop is untrusted input (RELIABILITY rules 13, 14): check its tree without following anything, take it into
the daemon's own `DEPLOY/incoming/`, and hash exactly the bytes seen.

- `scan_layout`: the drop must be a tree of regular files and directories. Symlinks (dangling or not), FIFOs,
  devices and sockets are refused with check `layout` naming the path; nothing is followed or opened (`lstat`
  only). Code (`.py` and other executable suffixes; `auto_map` / `custom_pipelines` in a `*config.json`) is refused
  with check `code`. Shard paths of a safetensors index must stay inside the drop.
- `take`: rename the drop into `DEPLOY/incoming/<id>` (a short daemon-chosen name, so any drop name works), or,
  when it cannot be renamed (another filesystem, a drop folder the daemon may not write), copy it with bounded
  reads and remove the original. What is hashed, verified and merged is that taken copy; a producer can no longer
  rewrite it by path, and any write through an open descriptor changes its ctime, which the worker checks again
  before publishing.
- `hash_tree`: sha256 of every file, reading exactly the size seen by `scan_layout` (`O_NOFOLLOW`, regular files
  only), never more.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recall_hf.durable import fsync_dir, write_json
from recall_hf.modeldir import READY
from recall_hf.versions import TMP_MARK

from .validation import DropRejected

logger = logging.getLogger(__name__)

CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".sh", ".exe", ".ipynb")
CODE_KEYS = ("auto_map", "custom_pipelines")
JSON_LIMIT = 64 << 20  # a config or index bigger than this is not a config
MAX_FILES = 100_000
CHUNK = 1 << 22
META_SUFFIX = ".json"
# Longest drop name used verbatim in quarantine/ and ingested/ (bytes); longer names are shortened + hashed.
NAME_BYTES = 160


class DropChanged(Exception):
    """A file of a taken drop is not what `scan_layout` saw (size or type changed): it is still being written."""


class CannotTake(Exception):
    """The drop can neither be renamed nor copied into `incoming/`."""


def printable(name: str) -> str:
    """A drop name safe for one log line or one JSON error: control characters (newlines...) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def safe_name(name: str) -> str:
    """A folder name derived from a drop name that any filesystem takes, with room for suffixes."""
    clean = "".join(c if c.isprintable() and c != "/" else "_" for c in name).lstrip(".") or "drop"
    if len(clean.encode()) <= NAME_BYTES and clean == name:
        return clean
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    short = clean.encode()[:NAME_BYTES - 13].decode("utf-8", "ignore")
    return f"{short}~{digest}"


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _refuse_entry(root: Path, rel: str, mode: int) -> DropRejected:
    what = _kind(mode)
    if stat.S_ISLNK(mode):
        what += f" (-> {printable(os.readlink(root / rel))})"
    return DropRejected("layout", f"{printable(rel)} is {what}; a drop holds regular files and directories only, "
                        "nothing is followed (copy with `cp -rL` or save the files themselves).")


def scan_layout(root: Path) -> dict[str, int]:
    """`{relative path: size}` of every regular file of the drop, checked with `lstat` only (nothing followed)."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse_entry(root.parent, root.name, st.st_mode)
    sizes: dict[str, int] = {}
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(root / rel_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                pending.append(rel)
            elif stat.S_ISREG(mode):
                if entry.name.lower().endswith(CODE_SUFFIXES):
                    raise DropRejected("code", f"{printable(rel)} is code; drops carry weights, configs, tokenizer "
                                       "files and samples only (no code runs or is published).")
                sizes[rel] = entry.stat(follow_symlinks=False).st_size
                if len(sizes) > MAX_FILES:
                    raise DropRejected("layout", f"more than {MAX_FILES} files; a task checkpoint has a few dozen.")
            else:
                raise _refuse_entry(root, rel, mode)
    return sizes


def _stream(root: Path, rel: str, size: int, sink: Callable[[bytes], object],
            check: Callable[[], None] | None = None) -> None:
    fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise DropChanged(f"{printable(rel)} changed since it was listed")
        left = size
        while left:
            block = os.read(fd, min(CHUNK, left))
            if not block:
                raise DropChanged(f"{printable(rel)} shrank while it was read")
            sink(block)
            left -= len(block)
            if check is not None:
                check()
    finally:
        os.close(fd)


def read_bounded(root: Path, rel: str, size: int) -> bytes:
    """Exactly `size` bytes of a regular file of the drop, never following a link; DropChanged otherwise."""
    chunks: list[bytes] = []
    _stream(root, rel, size, chunks.append)
    return b"".join(chunks)


def hash_tree(root: Path, sizes: dict[str, int], check: Callable[[], None] | None = None
              ) -> tuple[str, dict[str, str]]:
    """sha256 over the sorted relative paths and file hashes of a drop, `READY` excluded (any name, same content,
    same hash). Returns `(hash, {relative path: file sha256})`; reads exactly the listed sizes."""
    files: dict[str, str] = {}
    for rel in sorted(sizes):
        if rel == READY:
            continue
        h = hashlib.sha256()
        _stream(root, rel, sizes[rel], h.update, check)
        files[rel] = h.hexdigest()
    total = hashlib.sha256()
    for rel in sorted(files):
        total.update(f"{rel}\0{files[rel]}\n".encode())
    return total.hexdigest(), files


def _json(root: Path, rel: str, size: int) -> object:
    if size > JSON_LIMIT:
        raise DropRejected("layout", f"{printable(rel)} is {size} bytes; a JSON config is at most {JSON_LIMIT}.")
    try:
        return json.loads(read_bounded(root, rel, size))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not valid JSON: the check that reads it names the problem


def check_contents(root: Path, sizes: dict[str, int]) -> None:
    """No custom code in configs; every shard an index names is a regular file inside the drop."""
    for rel, size in sorted(sizes.items()):
        name = PurePosixPath(rel).name
        if name.endswith("config.json"):
            data = _json(root, rel, size)
            keys = [k for k in CODE_KEYS if isinstance(data, dict) and k in data]
            if keys:
                raise DropRejected("code", f"{printable(rel)} has {', '.join(keys)}: it asks for custom model code, "
                                   "which the daemon never runs or publishes; drop a checkpoint of a transformers "
                                   "architecture (save without auto_map).")
        elif name.endswith(".safetensors.index.json"):
            data = _json(root, rel, size)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if isinstance(weight_map, dict):
                check_shard_paths(rel, weight_map)


def check_shard_paths(index: str, weight_map: dict) -> None:
    """Shard paths stay inside the drop (an absent shard is the weights check's to name: an incomplete drop)."""
    for shard in sorted({v for v in weight_map.values() if isinstance(v, str)}):
        path = PurePosixPath(shard)
        if path.is_absolute() or ".." in path.parts or "\\" in shard:
            raise DropRejected("layout", f"{printable(index)} names shard {printable(shard)!r}, a path that leaves "
                               "the drop; shard paths are file names inside the drop.")


@dataclass(frozen=True)
class TakenDrop:
    """A drop the daemon took into `DEPLOY/incoming/<ident>/`; `name` is the producer's name for it."""

    ident: str
    name: str
    path: Path
    arrived_ns: int = 0
    why: str = ""
    source: str = ""

    @property
    def key(self) -> str:
        return f"incoming/{self.ident}"


@dataclass(frozen=True)
class Intake:
    """`DEPLOY/incoming/`: drops the daemon has taken and not yet merged, quarantined or removed."""

    folder: Path

    def taken(self) -> list[TakenDrop]:
        """Taken drops, oldest first (a crash or a deferral leaves one here; it is processed before new ones)."""
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.iterdir()):
            if TMP_MARK in p.name or p.name.endswith(META_SUFFIX):
                continue
            meta = self._meta(p)
            out.append(TakenDrop(p.name, meta.get("name") or p.name, p, int(meta.get("arrived_ns") or 0),
                                 str(meta.get("why") or "taken"), str(meta.get("source") or "")))
        return out

    def _meta(self, path: Path) -> dict:
        try:
            data = json.loads(path.with_name(path.name + META_SUFFIX).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def tidy(self) -> None:
        """Remove sidecars whose drop is gone (a crash between removing a drop and its sidecar)."""
        if self.folder.is_dir():
            for p in self.folder.glob(f"*{META_SUFFIX}"):
                if not p.with_name(p.name[: -len(META_SUFFIX)]).exists() and TMP_MARK not in p.name:
                    p.unlink(missing_ok=True)

    def take(self, path: Path, arrived_ns: int, why: str, sizes: dict[str, int] | None,
             check: Callable[[], None] | None = None) -> tuple[TakenDrop, bool]:
        """Move the drop at `path` into `incoming/`. Returns `(taken, removed)`: `removed` is False when it was
        copied but its original could not be deleted. Raises FileNotFoundError when it vanished, CannotTake when it
        can be neither renamed nor (hostile layout, unreadable) copied, DropChanged when it changed while it was
        copied, OSError(ENOSPC) when the copy ran out of space."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ident = f"d{time.time_ns()}"
        dest = self.folder / ident
        taken = TakenDrop(ident, path.name, dest, arrived_ns, why, str(path))
        write_json(self.folder / f"{ident}{META_SUFFIX}", {"name": path.name, "arrived_ns": arrived_ns, "why": why,
                                                           "source": str(path), "taken": time.time()})
        try:
            os.rename(path, dest)
            fsync_dir(self.folder)
            fsync_dir(path.parent)
            return taken, True
        except FileNotFoundError:
            self.forget(taken)
            raise
        except OSError as err:
            reason = err
        if sizes is None:
            self.forget(taken)
            raise CannotTake(f"cannot move it out of the drop folder ({reason.strerror or reason})")
        try:
            self._copy(path, dest, sizes, check)
        except OSError as err:
            self.forget(taken)
            if is_space_error(err) or isinstance(err, FileNotFoundError):
                raise
            raise CannotTake(f"cannot move it ({reason.strerror or reason}) nor copy it ({err})") from None
        except BaseException:  # DropChanged (still being written), a stop
            self.forget(taken)
            raise
        try:
            shutil.rmtree(path)
            fsync_dir(path.parent)
            return taken, True
        except OSError as err:
            logger.warning("Took a copy of drop %s, but cannot remove the original (%s); it is left in place.",
                           printable(path.name), err.strerror or err)
            return taken, False

    def _copy(self, src: Path, dest: Path, sizes: dict[str, int], check: Callable[[], None] | None) -> None:
        """Copy a checked tree (regular files only, bounded reads) to `dest` via a temp dir and a rename."""
        tmp = dest.with_name(f"{dest.name}{TMP_MARK}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for rel in sorted(sizes):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    _stream(src, rel, sizes[rel], out.write, check)
                    out.flush()
                    os.fsync(out.fileno())
            fsync_dir(tmp)
            os.rename(tmp, dest)
            fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def forget(self, taken: TakenDrop) -> None:
        """Forget a taken drop's sidecar (after the drop itself left `incoming/`)."""
        (self.folder / f"{taken.ident}{META_SUFFIX}").unlink(missing_ok=True)


def is_space_error(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def content_hash(path: Path) -> tuple[str, dict[str, str]]:
    """The content hash of a drop folder as the daemon computes it (layout checked first)."""
    return hash_tree(path, scan_layout(path))
