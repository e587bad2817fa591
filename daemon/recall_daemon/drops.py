"""The drop folder: which drops are complete, in what order they arrived, and each drop's content hash.

A drop is one sub-directory of the drop folder. It is complete when it holds a `READY` file (written last by the
producer, or present before the producer renamed the whole directory into place), or when none of its entries
changed for the quiet period. Names starting with `.` or ending in `.tmp`, `.partial` or `.incomplete` are
work in progress and never looked at; that is where a producer writes before renaming (the daemon itself never
names anything in the drop folder). A symlink in the drop folder is a drop too (refused by the layout check, never
followed); other non-directories are ignored.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from recall_hf.modeldir import READY

IN_PROGRESS_SUFFIXES = (".tmp", ".partial", ".incomplete")


@dataclass(frozen=True)
class Snapshot:
    """What a drop looks like on disk right now: enough to notice any write."""

    files: int
    size: int
    newest_ns: int
    entries: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class DropState:
    path: Path
    complete: bool
    why: str  # "READY", "quiet", "writing" or "symlink"
    arrived_ns: int  # newest change: the READY marker's creation, or the last write
    ready_at: float  # unix time it becomes complete by the quiet period (0 when complete)
    fingerprint: str = ""  # newest change, size and entries: a drop left in place is skipped while it matches

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def key(self) -> str:
        return self.name

    @property
    def order(self) -> tuple[int, str]:
        return (self.arrived_ns, self.path.name)


def is_candidate(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES):
        return False
    mode = os.lstat(path).st_mode
    return stat.S_ISDIR(mode) or stat.S_ISLNK(mode)


def snapshot(path: Path) -> Snapshot:
    """Sizes and change times (max of mtime and ctime, which copy tools cannot backdate) of every entry."""
    st = path.stat()
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    entries = []
    size = files = 0
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(dirs) + sorted(names):
            p = os.path.join(root, n)
            s = os.lstat(p)
            newest = max(newest, s.st_mtime_ns, s.st_ctime_ns)
            entries.append((os.path.relpath(p, path), s.st_size, s.st_mtime_ns))
            if n in names:
                files += 1
                size += s.st_size
    return Snapshot(files, size, newest, tuple(entries))


def drop_state(path: Path, quiet_period: float, now: float | None = None) -> DropState:
    now = time.time() if now is None else now
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):  # never followed: the layout check refuses it with its target named
        newest = max(st.st_mtime_ns, st.st_ctime_ns)
        return DropState(path, True, "symlink", newest, 0.0, f"{newest}-link")
    snap = snapshot(path)
    fingerprint = f"{snap.newest_ns}-{snap.size}-{len(snap.entries)}"
    if os.path.lexists(path / READY):
        return DropState(path, True, READY, snap.newest_ns, 0.0, fingerprint)
    ready_at = snap.newest_ns / 1e9 + quiet_period
    if snap.files and ready_at <= now:
        return DropState(path, True, "quiet", snap.newest_ns, 0.0, fingerprint)
    return DropState(path, False, "writing", snap.newest_ns, ready_at if snap.files else now + quiet_period,
                     fingerprint)


def scan(drop_dir: Path, quiet_period: float, skip: set[tuple[str, str]] = frozenset()
         ) -> tuple[list[DropState], list[DropState]]:
    """`(complete drops in arrival order, drops still being written)`; drops vanishing mid-scan are skipped, and
    so are the `(name, fingerprint)` pairs in `skip` (drops left in place, recorded once)."""
    complete, writing = [], []
    if not drop_dir.is_dir():
        return complete, writing
    now = time.time()
    for p in sorted(drop_dir.iterdir()):
        try:
            if not is_candidate(p):
                continue
            state = drop_state(p, quiet_period, now)
        except FileNotFoundError:
            continue
        if (state.name, state.fingerprint) in skip:
            continue
        (complete if state.complete else writing).append(state)
    complete.sort(key=lambda s: s.order)
    return complete, writing
