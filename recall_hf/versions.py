"""`VersionedDir`: immutable versions `vNNNN` in one folder and a symlink naming the live one, switched atomically.

Used by `callback.fold_into` for its rolling merged model (`<merge_into>.versions/vNNNN`, link `<merge_into>`); built
so the daemon's deploy folder (`versions/vNNNN`, link `current`) can use it too:
- `versions()` / `next_name()` / `path(name)`: names `v0000`, `v0001`, ... (4+ digits), oldest first;
- `switch(name)`: a temporary relative symlink renamed over the link (`os.replace`), then the parent fsynced, so a
  reader sees the old or the new target, never a missing link;
- `prune(keep, newest)`: never the live version; each removed version is first renamed to a `*.tmp-*` name and only
  then deleted, so a crash leaves a leftover that `stale()` finds, never a half-deleted version under its real name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path

from .durable import fsync_dir

VERSION_RE = re.compile(r"^v(\d{4,})$")
TMP_MARK = ".tmp-"


def version_number(name: str) -> int:
    """`"v0012"` -> 12; a `ValueError` for anything that is not a version name."""
    m = VERSION_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a version name; versions are named v0000, v0001, ...")
    return int(m.group(1))


class VersionedDir:
    """Versions `root/vNNNN` and the symlink `link` to the live one.

    Args:
        root: the folder holding the versions (created on demand).
        link: the symlink naming the live version; its target is written relative to the link's folder.
        first: the number of the first version (`0` for a deploy folder whose `v0000` is the base).
    """

    def __init__(self, root: str | Path, link: str | Path, first: int = 0):
        self.root, self.link, self.first = Path(root), Path(link), first

    def versions(self) -> list[str]:
        """Version names present, oldest first (hidden and `*.tmp-*` entries are not versions)."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(names, key=version_number)

    def path(self, name: str) -> Path:
        version_number(name)
        return self.root / name

    def next_name(self) -> str:
        """The name after the newest version (`first` when there is none)."""
        versions = self.versions()
        return f"v{version_number(versions[-1]) + 1 if versions else self.first:04d}"

    def current(self) -> str | None:
        """The version the link points at, or `None` when it is missing, dangling or points elsewhere."""
        try:
            target = (self.link.parent / os.readlink(self.link)).resolve()
        except OSError:
            return None
        if target.parent != self.root.resolve() or not VERSION_RE.match(target.name) or not target.is_dir():
            return None
        return target.name

    def switch(self, name: str) -> None:
        """Point the link at version `name` atomically (temp symlink + `os.replace` + fsync of the link's folder)."""
        target = self.path(name)
        if not target.is_dir():
            raise ValueError(f"Version {target} does not exist; cannot switch {self.link} to it.")
        tmp = self.link.with_name(f".{self.link.name}{TMP_MARK}{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.link.parent), tmp)
        os.replace(tmp, self.link)
        fsync_dir(self.link.parent)

    def prune(self, keep: Collection[str] = (), newest: int = 0) -> list[str]:
        """Delete every version but those in `keep`, the `newest` ones and the live one (`current()`), each renamed
        to a `*.tmp-*` name first; returns the names removed, oldest first."""
        versions = self.versions()
        kept = set(keep) | set(versions[len(versions) - newest:] if newest > 0 else []) | {self.current()}
        removed = []
        for name in versions:
            if name in kept:
                continue
            doomed = self.root / f"{name}{TMP_MARK}{os.getpid()}.deleting"
            os.rename(self.root / name, doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed)
            removed.append(name)
        return removed

    def stale(self) -> list[Path]:
        """Leftovers of an interrupted write or prune (`*.tmp-*` entries in the versions folder)."""
        return sorted(p for p in self.root.iterdir() if TMP_MARK in p.name) if self.root.is_dir() else []
