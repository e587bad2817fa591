"""The ledger: an append-only JSON-lines record of every drop the daemon handled (RELIABILITY rule 3).

One line per event: `init` (the base published as v0000), `merged` (a drop went live: its content hash names
exactly the bytes that were merged), `duplicate` (content already merged, nothing done), `quarantined` (a check
failed; `left_in_place` when the drop could not be moved out of the drop folder), `left` (a drop was merged from a
copy but its original could not be removed) and `rollback`. Lines are appended with fsync; a line torn by a crash
is cut on start (`repair`).

A drop left in place is remembered by its name and `fingerprint` (newest change time, size and file count of the
tree): the daemon skips it as long as it is unchanged, so it is recorded once and never blocks the queue.
"""

from __future__ import annotations

import json
import logging
import os
import time
from enum import Enum
from pathlib import Path

logger = logging.getLogger(__name__)


class Result(str, Enum):
    """The `result` field of a ledger line."""

    INIT = "init"
    MERGED = "merged"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    LEFT = "left"
    ROLLBACK = "rollback"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Ledger:
    """`DEPLOY/ledger.jsonl`: read, repaired and appended to by the daemon (and `recall-hf rollback`)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        """Every ledger line, oldest first; an unterminated last line (torn by a crash) is ignored."""
        if not self.path.exists():
            return []
        entries = []
        lines = self.path.read_text().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    logger.warning("Ignoring a torn last line of %s.", self.path)
                else:
                    logger.error("Skipping an unreadable line %d of %s.", i + 1, self.path)
        return entries

    def repair(self) -> None:
        """Cut a torn, unterminated last line (a crash mid-append) so the next line starts clean."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning("Cutting a torn last line (%d bytes) off %s.", len(data) - keep, self.path)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())

    def append(self, result: Result, **fields) -> dict:
        entry = {"time": now_iso(), **fields, "result": Result(result).value}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def merged(self) -> dict[str, dict]:
        """Content hash -> ledger line of every drop merged so far (a drop with one of these is a no-op)."""
        return {e["hash"]: e for e in self.entries() if e.get("result") == Result.MERGED and e.get("hash")}

    def left_in_place(self) -> set[tuple[str, str]]:
        """`(drop name, fingerprint)` of every drop recorded as left in the drop folder: skipped while unchanged."""
        return {(e["drop"], e["fingerprint"]) for e in self.entries()
                if e.get("left_in_place") and isinstance(e.get("drop"), str) and e.get("fingerprint")}

    def published_weights(self) -> dict[str, dict]:
        """sha256 of each published version's weight files -> its merged line (to recognise a re-dropped version)."""
        out = {}
        for e in self.entries():
            weights = e.get("version_sha256")
            if e.get("result") == Result.MERGED and isinstance(weights, dict):
                out[json.dumps(weights, sort_keys=True)] = e
        return out
