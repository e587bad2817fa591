"""Where a drop goes when the daemon is done with it (RELIABILITY rules 7, 9, 14). One word per way out:

- `retire`: merged, or a duplicate of merged content: deleted, or moved to `DEPLOY/ingested/<name>-<hash12>/`
  with `after_ingest = "move"`.
- `quarantine`: a check failed: `DEPLOY/quarantine/<name>/` holds `REASON.json` and the drop under `drop/`.
- `quarantine_in_place`: a check failed but the drop cannot be moved out of the drop folder: `REASON.json` only,
  the ledger records the drop's name and fingerprint, and the drop is skipped while it stays unchanged.
- `leave`: a drop merged from a copy whose original cannot be deleted: recorded once, skipped while unchanged.
- `defer`: not the drop's fault (disk full): it waits in `incoming/` and the queue retries after `retry_after`.

Every folder name the daemon makes from a drop name goes through `safe_name` (any length, any character).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from recall_hf.durable import fsync_dir, write_json

from .config import DaemonConfig
from .intake import TMP_MARK, Intake, TakenDrop, printable, safe_name
from .ledger import Result
from .metrics import Metrics
from .store import REASON_NAME, DeployStore, now_iso, unique_path
from .validation import DropRejected

logger = logging.getLogger(__name__)

QUARANTINED_DROP = "drop"  # the drop's own files, under quarantine/<name>/


class Disposal:
    def __init__(self, config: DaemonConfig, store: DeployStore, intake: Intake, metrics: Metrics,
                 report: Callable[[dict], None]):
        self.config, self.store, self.intake, self.metrics = config, store, intake, metrics
        self.report = report  # the worker's last_error
        self.deferred: dict[str, float] = {}  # queue key -> unix time it may be retried

    def retire(self, path: Path, name: str, digest: str, ident: str = "") -> None:
        """Take a merged (or duplicate) drop out of `incoming/`; nothing to do when it is already gone."""
        if path.exists():
            if self.config.after_ingest == "move":
                self.store.ingested_dir.mkdir(exist_ok=True)
                dest = self.store.ingested_dir / f"{safe_name(name)}-{digest[:12]}"
                if dest.exists():
                    self._delete(path)
                else:
                    os.rename(path, dest)
                    fsync_dir(self.store.ingested_dir)
            else:
                self._delete(path)
        if ident:
            self.intake.forget(TakenDrop(ident, name, path))

    def _delete(self, path: Path) -> None:
        doomed = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}.deleting")
        os.rename(path, doomed)  # a crash mid-delete leaves a `*.tmp-*` leftover, removed on start
        fsync_dir(path.parent)
        shutil.rmtree(doomed)

    def quarantine(self, taken: TakenDrop, digest: str, rej: DropRejected, parent: str | None) -> None:
        """Move a taken drop to `quarantine/<name>/drop/` beside its `REASON.json` (complete or not at all)."""
        dest = unique_path(self.store.quarantine_dir / safe_name(taken.name))
        tmp = self.store.quarantine_dir / f"{dest.name}{TMP_MARK}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_json(tmp / REASON_NAME, self._reason(taken.name, digest, rej, parent))
        os.rename(taken.path, tmp / QUARANTINED_DROP)
        os.rename(tmp, dest)
        fsync_dir(self.store.quarantine_dir)
        self.intake.forget(taken)
        self._record(taken.name, digest, rej, dest, {})

    def quarantine_in_place(self, path: Path, fingerprint: str, rej: DropRejected, parent: str | None) -> None:
        """A rejected drop that cannot leave the drop folder: its reason is recorded, the drop is skipped."""
        dest = unique_path(self.store.quarantine_dir / safe_name(path.name))
        tmp = self.store.quarantine_dir / f"{dest.name}{TMP_MARK}{os.getpid()}"
        tmp.mkdir(parents=True)
        reason = self._reason(path.name, "-", rej, parent)
        reason["left_in_place"] = str(path)
        reason["hint"] = ("The drop could not be moved out of the drop folder and stays there, skipped while it is "
                          "unchanged; remove or fix it.")
        write_json(tmp / REASON_NAME, reason)
        os.rename(tmp, dest)
        fsync_dir(self.store.quarantine_dir)
        self._record(path.name, "-", rej, dest, {"left_in_place": True, "fingerprint": fingerprint})

    def _reason(self, name: str, digest: str, rej: DropRejected, parent: str | None) -> dict:
        return {"drop": name, "hash": digest, "check": rej.check, "error": rej.message, "time": now_iso(),
                "deployed_version": parent, **({"details": rej.details} if rej.details else {}),
                "hint": "Fix the checkpoint and drop it again under any name; this copy is kept for inspection."}

    def _record(self, name: str, digest: str, rej: DropRejected, dest: Path, extra: dict) -> None:
        self.store.ledger.append(Result.QUARANTINED, hash=digest, drop=name, check=rej.check, error=rej.message,
                                 quarantine=dest.name, **extra)
        self.metrics.quarantined.labels(rej.check).inc()
        self.report({"kind": "quarantined", "drop": name, "hash": digest, "check": rej.check, "error": rej.message,
                     "time": now_iso()})
        logger.error("Drop %s [%s] quarantined to %s: %s check failed: %s", printable(name), digest[:12], dest,
                     rej.check, rej.message)

    def leave(self, path: Path, fingerprint: str, digest: str) -> None:
        """Record once that the original of a drop merged from a copy stays in the drop folder (skipped)."""
        self.store.ledger.append(Result.LEFT, hash=digest, drop=path.name, left_in_place=True,
                                 fingerprint=fingerprint, path=str(path))
        logger.warning("Drop %s [%s] stays in the drop folder (it cannot be removed); it is skipped from now on.",
                       printable(path.name), digest[:12])

    def defer(self, key: str, name: str, digest: str, reason: str, message: str) -> None:
        retry = time.time() + self.config.retry_after
        self.deferred[key] = retry
        self.metrics.deferred.labels(reason).inc()
        self.report({"kind": reason, "drop": name, "hash": digest, "error": message, "time": now_iso(),
                     "retry_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(retry))})
        logger.error("Drop %s [%s] deferred (%s): %s; retrying in %.0fs. The live version is unchanged.",
                     printable(name), digest[:12], reason, message, self.config.retry_after)

    def finish_interrupted(self) -> None:
        """A crash mid-quarantine leaves `quarantine/<name>.tmp-<pid>/` with REASON.json: finish the move."""
        for tmp in sorted(self.store.quarantine_dir.glob(f"*{TMP_MARK}*")):
            try:
                reason = json.loads((tmp / REASON_NAME).read_text())
            except (OSError, ValueError):
                continue  # not begun: removed with the other leftovers; the drop is still in incoming/
            if not ((tmp / QUARANTINED_DROP).exists() or reason.get("left_in_place")):
                continue
            drop = reason.get("drop", "")
            dest = unique_path(self.store.quarantine_dir / safe_name(str(drop)))
            logger.warning("Recovering: finishing the quarantine of %s.", printable(str(drop)))
            os.rename(tmp, dest)
            fsync_dir(self.store.quarantine_dir)
