"""The deploy folder (SPEC 3): immutable versions, the `current` symlink, the ledger, quarantine, status.

```
DEPLOY/
  versions/v0000/ ...       immutable model versions (v0000 = the base); staged as vNNNN.tmp-<pid>
  current -> versions/vNNNN the live version, switched with a temp symlink + os.replace
  ledger.jsonl              append-only: one line per drop handled (ledger.py)
  journal.json              the publish in flight (journal.py)
  incoming/<id>/            drops taken out of the drop folder and not yet handled (intake.py)
  quarantine/<name>/        rejected drops: REASON.json, and the drop itself under drop/
  ingested/                 merged drops, when after_ingest = "move"
  gate-logs/                the --gate command's output per staged version (gate.py)
  status.json  metrics.prom  daemon.lock  publish.lock
```
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from recall_hf.durable import write_json
from recall_hf.modeldir import ADAPTER_STEM, is_adapter_dir
from recall_hf.safetensors_io import CheckpointReader
from recall_hf.versions import TMP_MARK, VERSION_RE, VersionedDir, version_number

from .journal import Journal
from .ledger import Ledger, Result, now_iso

logger = logging.getLogger(__name__)

__all__ = ["TMP_MARK", "VERSION_RE", "DeployStore", "version_number"]

VERSION_INFO = "version.json"
REASON_NAME = "REASON.json"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def unique_path(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(2, 10_000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"Too many entries named like {path}; clean up {path.parent}.")


class DeployStore:
    """Paths and atomic operations of one deploy folder. Only the daemon holding `daemon.lock` publishes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.current_link = self.root / "current"
        self.ledger = Ledger(self.root / "ledger.jsonl")
        self.journal = Journal(self.root / "journal.json")
        self.incoming_dir = self.root / "incoming"
        self.quarantine_dir = self.root / "quarantine"
        self.ingested_dir = self.root / "ingested"
        self.status_path = self.root / "status.json"
        self.metrics_path = self.root / "metrics.prom"
        self.lock_path = self.root / "daemon.lock"
        self.publish_lock_path = self.root / "publish.lock"
        # v0000 is the base; `current` is a relative link, so the deploy folder can move.
        self.vdir = VersionedDir(self.versions_dir, self.current_link, first=0)

    def ensure_layout(self) -> None:
        for d in (self.root, self.versions_dir, self.quarantine_dir, self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- versions (recall_hf.versions.VersionedDir) ------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published version names, oldest first."""
        return self.vdir.versions()

    def version_dir(self, name: str) -> Path:
        return self.vdir.path(name)

    def next_version(self) -> str:
        return self.vdir.next_name()

    def version_info(self, name: str) -> dict:
        path = self.version_dir(name) / VERSION_INFO
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def check_version(self, name: str) -> None:
        """Raise ValueError unless `versions/<name>` is a complete model or adapter (cheap: headers and sizes)."""
        path = self.version_dir(name)
        if not path.is_dir():
            raise ValueError(f"{path} does not exist.")
        if is_adapter_dir(path):
            CheckpointReader(path, stem=ADAPTER_STEM)
        elif (path / "config.json").is_file():
            CheckpointReader(path)
        else:
            raise ValueError(f"{path} holds neither config.json nor adapter_config.json.")

    def is_good(self, name: str) -> bool:
        try:
            self.check_version(name)
            return True
        except (ValueError, OSError) as err:
            logger.warning("Version %s is not usable: %s", name, err)
            return False

    # -- current ----------------------------------------------------------------------------------------------------
    def current(self) -> str | None:
        """The version `current` points to, or None when the link is missing, dangling or not a version."""
        return self.vdir.current()

    def resolve_current(self) -> str | None:
        """The live version; a missing, dangling or broken `current` degrades to the newest good version."""
        name = self.current()
        if name is not None and self.is_good(name):
            return name
        for candidate in reversed(self.versions()):
            if self.is_good(candidate):
                logger.error("`current` is %s; degrading to the last good version %s.",
                             "broken" if name else "missing or dangling", candidate)
                self.switch_current(candidate)
                return candidate
        return None

    def switch_current(self, name: str) -> None:
        """Point `current` at `versions/<name>` atomically (temp symlink + `os.replace` + fsync)."""
        self.vdir.switch(name)

    def parent_of(self, name: str) -> str | None:
        """The version `name` was merged from (its predecessor), from its `version.json`."""
        parent = self.version_info(name).get("parent")
        return parent if isinstance(parent, str) and VERSION_RE.match(parent) else None

    # -- housekeeping -----------------------------------------------------------------------------------------------
    def stale_paths(self) -> list[Path]:
        """Leftovers of an interrupted write: `*.tmp-*` entries in the deploy folder and its sub-folders."""
        found = []
        for folder in (self.root, self.versions_dir, self.quarantine_dir, self.ingested_dir, self.incoming_dir):
            if folder.is_dir():
                found += [p for p in folder.iterdir() if TMP_MARK in p.name]
        return sorted(found)

    def remove_stale(self) -> list[Path]:
        removed = self.stale_paths()
        for p in removed:
            logger.warning("Removing stale %s left by an interrupted write.", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return removed

    def protected(self) -> set[str]:
        live = self.current()
        keep = {"v0000"}
        if live:
            keep.add(live)
            parent = self.parent_of(live)
            if parent:
                keep.add(parent)
        return keep

    def prune(self, keep: int) -> list[str]:
        """Delete versions beyond the newest `keep`, never the live one, its predecessor or v0000 (the base)."""
        protected = self.protected()
        removed = self.vdir.prune(protected, newest=keep)
        for name in removed:
            logger.info("Pruned version %s (keeping the newest %d and %s)", name, keep, ", ".join(sorted(protected)))
        return removed

    # -- status -----------------------------------------------------------------------------------------------------
    def read_status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_status(self, status: dict) -> None:
        write_json(self.status_path, status)

    # -- quarantine -------------------------------------------------------------------------------------------------
    def quarantined(self) -> list[dict]:
        out = []
        if self.quarantine_dir.is_dir():
            for p in sorted(self.quarantine_dir.iterdir()):
                if p.is_dir() and TMP_MARK not in p.name:
                    try:
                        reason = json.loads((p / REASON_NAME).read_text())
                    except (OSError, ValueError):
                        reason = {}
                    out.append({"name": p.name, **reason})
        return out

    # -- locks ------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def publish_lock(self, timeout: float = 60.0) -> Iterator[None]:
        """Serialises switching `current` between the daemon and `recall-hf rollback`."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.publish_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.publish_lock_path} stayed locked for {timeout:.0f}s; another "
                                           "process is switching `current`. Try again.") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    # -- rollback ---------------------------------------------------------------------------------------------------
    def rollback(self, to: str | None = None) -> tuple[str | None, str]:
        """Point `current` at `to` (default: the live version's predecessor). Returns `(from, to)`."""
        with self.publish_lock():
            live = self.current()
            if to is None:
                if live is None:
                    raise RuntimeError(f"{self.current_link} is missing; name the version with --to "
                                       f"(available: {', '.join(self.versions()) or 'none'}).")
                to = self.parent_of(live)
                if to is None:
                    older = [v for v in self.versions() if version_number(v) < version_number(live)]
                    to = older[-1] if older else None
                if to is None:
                    raise RuntimeError(f"{live} has no predecessor to roll back to.")
            if to not in self.versions():
                raise ValueError(f"No version {to!r} in {self.versions_dir}; available: "
                                 f"{', '.join(self.versions()) or 'none'}.")
            self.check_version(to)
            self.switch_current(to)
            self.ledger.append(Result.ROLLBACK, event="rollback", **{"from": live}, version=to)
            status = self.read_status()
            if status:
                status.update(current=to, updated=now_iso())
                self.write_status(status)
        logger.info("Rolled back: current %s -> %s", live, to)
        return live, to
