"""The publish journal: one small JSON file recording how far the current drop's publish got (RELIABILITY rule 6).

States, in order:

- `idle`: nothing in flight (also what a missing journal means).
- `intent`: a drop is being merged into `versions/<version>.tmp-<pid>` and gated (gate.py); nothing visible changed
  yet.
  Recovery: delete the staging dir; the drop is still in the drop folder and is merged again.
- `merged`: the staged version is complete, validated and fsynced; the rename into `versions/<version>` and the
  switch of `current` may or may not have happened. Recovery: finish the rename and the switch, then as `published`.
- `published`: `current` points to the new version. Recovery: finish the bookkeeping (ledger line, drop removal,
  pruning, status), each step idempotent.

Every write goes through a temp file, fsync and `os.replace`, then an fsync of the folder, so after a crash the
journal holds exactly one of these states.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from recall_hf.durable import fsync_dir, write_json

logger = logging.getLogger(__name__)

IDLE, INTENT, MERGED, PUBLISHED = "idle", "intent", "merged", "published"
STATES = (IDLE, INTENT, MERGED, PUBLISHED)


@dataclass
class JournalEntry:
    """The drop in flight: where it is, what it becomes, and how far it got."""

    state: str = IDLE
    drop: str = ""
    drop_path: str = ""
    hash: str = ""
    task: str = ""
    version: str = ""
    parent: str = ""
    staging: str = ""
    pid: int = 0
    started: str = ""
    updated: str = ""
    merge_seconds: float = 0.0
    gates: dict = field(default_factory=dict)  # the promotion gates' results (gate.py), for the ledger line

    def advance(self, state: str, **changes) -> JournalEntry:
        if state not in STATES:
            raise ValueError(f"Unknown journal state {state!r}; states are {', '.join(STATES)}.")
        values = {**asdict(self), **changes, "state": state}
        return JournalEntry(**values)


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> JournalEntry:
        """The recorded entry; a missing or unreadable journal reads as `idle` (recovery then reconciles)."""
        if not self.path.exists():
            return JournalEntry()
        try:
            data = json.loads(self.path.read_text())
            known = {f.name for f in fields(JournalEntry)}
            entry = JournalEntry(**{k: v for k, v in data.items() if k in known})
            if entry.state not in STATES:
                raise ValueError(f"unknown state {entry.state!r}")
            return entry
        except (ValueError, TypeError, OSError) as err:
            logger.error("Journal %s is unreadable (%s); treating it as idle, reconciling from disk.", self.path, err)
            return JournalEntry()

    def write(self, entry: JournalEntry) -> JournalEntry:
        entry.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entry.pid = os.getpid()
        write_json(self.path, asdict(entry))
        fsync_dir(self.path.parent)
        logger.debug("Journal: %s %s %s", entry.state, entry.version, entry.hash[:12])
        return entry
