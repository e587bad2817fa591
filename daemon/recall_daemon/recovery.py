"""Recovery on start: bring the deploy folder back to a consistent state after whatever stopped the last run
(RELIABILITY rule 6).

- A quarantine cut short is finished; the journal's publish in flight is finished or abandoned: `intent` -> the
  staging dir is deleted and the drop, still in `incoming/`, is merged again; `merged` -> the rename and switch are
  finished; `published` -> the bookkeeping is finished.
- Leftover `*.tmp-*` are deleted, a torn last ledger line is cut, and the ledger gains any `merged` line the live
  version's lineage lacks. Taken drops still in `incoming/` are processed before new ones.
- Nothing in the drop folder is touched: the producer's names are the producer's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .journal import INTENT, MERGED, PUBLISHED
from .ledger import Result
from .validation import DropRejected, read_samples

if TYPE_CHECKING:
    from .worker import Worker

logger = logging.getLogger(__name__)


class Recovery:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.store = worker.store

    def run(self) -> None:
        w, store = self.worker, self.store
        store.ensure_layout()
        w.drop_dir.mkdir(parents=True, exist_ok=True)
        if w.config.probes:
            try:
                w.probe_texts = read_samples(Path(w.config.probes), str(w.config.probes))
            except DropRejected as rej:
                raise ValueError(f"--probes: {rej.message}") from None
        store.ledger.repair()
        w.disposal.finish_interrupted()
        self._journal()
        store.remove_stale()
        w.intake.tidy()
        live = store.resolve_current()
        if live is not None:
            self._reconcile_ledger(live)

    def _journal(self) -> None:
        w, entry = self.worker, self.store.journal.read()
        if entry.state == INTENT:
            logger.warning("Recovering: the merge of drop %s [%s] into %s was interrupted; discarding its staging dir "
                           "(the drop is merged again).", entry.drop, entry.hash[:12], entry.version)
            w.publisher.abandon(entry)
        elif entry.state == MERGED:
            logger.warning("Recovering: drop %s [%s] was merged as %s but not published; publishing it now.",
                           entry.drop, entry.hash[:12], entry.version)
            if w.publisher.publish(entry, recovering=True):
                w.finish(entry, recovering=True)
            else:
                w.publisher.abandon(entry, remove_version=True)
        elif entry.state == PUBLISHED:
            logger.warning("Recovering: drop %s [%s] is live as %s; finishing its bookkeeping.",
                           entry.drop, entry.hash[:12], entry.version)
            w.finish(entry, recovering=True)

    def _reconcile_ledger(self, live: str) -> None:
        """Every drop in the live version's lineage has its `merged` ledger line (repairs a lost journal)."""
        merged = self.store.ledger.merged()
        for task in self.store.version_info(live).get("tasks", []):
            if task.get("hash") and task["hash"] not in merged:
                logger.warning("Ledger lacks drop %s [%s] of live version %s; adding it.", task.get("name"),
                               task["hash"][:12], task.get("version"))
                self.store.ledger.append(Result.MERGED, hash=task["hash"], drop=task.get("name"),
                                         task=task.get("task"), version=task.get("version"), recovered=True)
