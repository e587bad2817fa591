"""The worker: one drop at a time, take -> check -> merge -> publish -> retire; the status it reports.

A drop's way through (RELIABILITY rules 2-7, 9, 12-14):

1. take (intake.py): its tree is checked with `lstat` (regular files and directories only, no code), then it is
   renamed (or, across filesystems, copied with bounded reads) into `DEPLOY/incoming/<id>/`; a drop that cannot
   be taken is quarantined in place, recorded once and skipped;
2. content hash of the taken tree (reads bounded by the listed sizes); a hash already merged is a duplicate;
3. `verify_drop` (index vs shards, every tensor read and finite, sha256 vs `recall.json`, `task_count`,
   architecture, samples); a failure quarantines the drop (disposal.py);
4. free-space check, then the journaled publish (publisher.py): `intent`, merge, validation, the taken tree is
   checked unchanged, `merged`, rename + switch of `current`, `published`;
5. bookkeeping: the ledger line names the hash that went live, the drop is retired, old versions pruned, `idle`.

Disk full anywhere in 1 or 4 defers the drop (it is not the drop's fault): it waits, and the queue with it, for
`retry_after` seconds. Recovery after a crash is recovery.py.
"""

from __future__ import annotations

import logging
import os
import time
from enum import Enum
from pathlib import Path

from recall_hf.errors import first_line

from .config import DaemonConfig
from .disposal import Disposal
from .drops import DropState, scan, snapshot
from .intake import CannotTake, DropChanged, Intake, TakenDrop, check_contents, hash_tree, is_space_error, printable
from .intake import scan_layout as check_layout
from .journal import JournalEntry
from .ledger import Result
from .metrics import Metrics
from .publisher import Publisher
from .stop import StopRequested, StopToken
from .store import DeployStore, dir_size, free_bytes, now_iso
from .validation import DropInfo, DropRejected, verify_drop

logger = logging.getLogger(__name__)


class Outcome(Enum):
    """What processing one drop came to."""

    MERGED = "merged"  # a new live version
    DUPLICATE = "duplicate"  # content already merged: retired, nothing else
    QUARANTINED = "quarantined"  # a check failed (or it could not be taken): recorded with its reason
    DEFERRED = "deferred"  # disk full: retried after retry_after
    STOPPED = "stopped"  # SIGTERM/SIGINT: nothing published, the drop is processed on the next start
    REQUEUED = "requeued"  # `current` moved (rollback) or the drop changed during the merge: processed again
    WAITING = "waiting"  # still being written: looked at again after a pause
    GONE = "gone"  # vanished before it was taken


class Worker:
    """Processes drops for one deploy folder. Not thread-safe: exactly one worker per deploy (`daemon.lock`)."""

    def __init__(self, config: DaemonConfig, store: DeployStore, metrics: Metrics, stop: StopToken | None = None):
        self.config, self.store, self.metrics = config, store, metrics
        self.stop = stop or StopToken()
        self.drop_dir = Path(config.drop_dir)
        previous = store.read_status()
        self.last_error: dict | None = previous.get("last_error")
        self.last_success: dict | None = previous.get("last_success")
        if self.last_success and self.last_success.get("unix"):
            metrics.last_success.set(self.last_success["unix"])
        self.state = "starting"
        self.queue: list[str] = []
        self.writing: list[str] = []
        self.watcher = "none"
        self.metrics_port: int | None = None
        self.started = now_iso()
        self.probe_texts: list[str] | None = None
        self.quarantined = 0  # drops quarantined by this process (`--once` exits 3 when any)
        self._status_written: dict | None = None
        self.intake = Intake(store.incoming_dir)
        self.publisher = Publisher(config, store, metrics, self.stop, self.set_state)
        self.disposal = Disposal(config, store, self.intake, metrics, self._report)

    def _report(self, error: dict) -> None:
        self.last_error = error
        if error.get("kind") == "quarantined":
            self.quarantined += 1

    @property
    def deferred(self) -> dict[str, float]:
        return self.disposal.deferred

    # -- startup -------------------------------------------------------------------------------------------------
    def recover(self) -> None:
        from .recovery import Recovery

        Recovery(self).run()

    def initialise(self) -> str:
        """Make sure there is a live version: keep the existing one, or copy `--base` (a folder, or a Hub id resolved
        here, once) to `versions/v0000`."""
        versions = self.store.versions()
        if versions:
            if self.config.base:
                logger.info("Deploy folder %s already holds %s; --base is ignored.", self.store.root, versions[-1])
            live = self.store.resolve_current()
            if live is None:
                raise RuntimeError(f"No usable version in {self.store.versions_dir} ({', '.join(versions)}); restore "
                                   "one from backup or initialise a fresh deploy folder with --base.")
            return live
        if not self.config.base:
            raise RuntimeError(f"Deploy folder {self.store.root} has no version yet; pass --base MODEL_DIR to publish "
                               "the base model as versions/v0000.")
        from .publisher import resolve_base_source

        base, origin = resolve_base_source(self.config.base)
        return self.publisher.publish_base(base, self.probe_texts, origin)

    # -- the queue -----------------------------------------------------------------------------------------------
    def pending(self) -> tuple[list[DropState | TakenDrop], float]:
        """Drops that may be processed now, oldest first (taken ones before new ones), and the unix time something
        else becomes due. A drop deferred for lack of space blocks the queue until its retry time: later drops
        would hit the same wall, and arrival order is kept. Drops left in place are skipped while unchanged."""
        taken = self.intake.taken()
        complete, writing = scan(self.drop_dir, self.config.quiet_period, self.store.ledger.left_in_place())
        queue: list[DropState | TakenDrop] = [*taken, *complete]
        now = time.time()
        keys = {item.key for item in queue}
        self.disposal.deferred = {k: t for k, t in self.disposal.deferred.items() if k in keys}
        self.queue, self.writing = [item.name for item in queue], [s.name for s in writing]
        self.metrics.queue.set(len(queue))
        self.metrics.waiting.set(len(writing))
        due = [s.ready_at for s in writing]
        retry = self.disposal.deferred.get(queue[0].key, 0) if queue else 0
        if retry > now:
            return [], min(due + [retry])
        return queue, min(due, default=float("inf"))

    # -- one drop ------------------------------------------------------------------------------------------------
    def process(self, item: DropState | TakenDrop) -> Outcome:
        """Take one drop all the way: no-op, quarantine, deferral, or a new live version."""
        taken = item if isinstance(item, TakenDrop) else self._take(item)
        if isinstance(taken, Outcome):
            return taken
        examined = self._examine(taken)
        if isinstance(examined, Outcome):
            return examined
        digest, files, snap = examined
        logger.info("Drop %s [sha256 %s] (%s) taken", printable(taken.name), digest[:12], taken.why)
        earlier = self.store.ledger.merged().get(digest)
        if earlier is not None:
            return self._duplicate(taken, digest, earlier)
        parent = self.store.resolve_current()
        if parent is None:
            raise RuntimeError(f"No usable live version in {self.store.root}; cannot merge {printable(taken.name)}.")
        self.set_state(f"verifying {printable(taken.name)}")
        try:
            with self.stop.interruptible():
                info = verify_drop(taken.path, self.store.version_dir(parent), files, self.config.probes, taken.name,
                                   self.publisher.produced_task_count, base=self.publisher.adapter_base())
        except DropRejected as rej:
            self.disposal.quarantine(taken, digest, rej, parent)
            return Outcome.QUARANTINED
        if not self._space_for(taken, digest, parent):
            return Outcome.DEFERRED
        return self._merge(taken, digest, info, parent, snap)

    def _take(self, drop: DropState) -> TakenDrop | Outcome:
        """Move a drop out of the producer's folder into `incoming/`, refusing a hostile tree up front."""
        rejected, sizes = None, None
        try:
            sizes = check_layout(drop.path)
        except FileNotFoundError:
            return Outcome.GONE
        except DropRejected as rej:
            rejected = rej
        except OSError as err:
            rejected = DropRejected("layout", f"cannot read the drop: {printable(first_line(err))}")
        parent = self.store.current()
        try:
            with self.stop.interruptible():
                taken, removed = self.intake.take(drop.path, drop.arrived_ns, drop.why, sizes, self.stop.check)
        except FileNotFoundError:
            logger.info("Drop %s vanished before it was taken.", printable(drop.name))
            return Outcome.GONE
        except DropChanged as err:
            logger.info("Drop %s is still being written (%s); waiting for it to settle.", printable(drop.name), err)
            return Outcome.WAITING
        except CannotTake as err:
            rejected = rejected or DropRejected("layout", str(err))
            self.disposal.quarantine_in_place(drop.path, drop.fingerprint, rejected, parent)
            return Outcome.QUARANTINED
        except OSError as err:
            if not is_space_error(err):
                raise
            self.disposal.defer(drop.key, drop.name, "-", "no_space", f"no space to take the drop into "
                                f"{self.store.incoming_dir}: {first_line(err)}")
            return Outcome.DEFERRED
        if not removed:
            self.disposal.leave(drop.path, drop.fingerprint, "-")
        if rejected is not None:
            self.disposal.quarantine(taken, "-", rejected, parent)
            return Outcome.QUARANTINED
        return taken

    def _examine(self, taken: TakenDrop) -> tuple[str, dict[str, str], object] | Outcome:
        """Check the taken tree again (what was renamed is what is read) and hash it with bounded reads."""
        try:
            with self.stop.interruptible():
                sizes = check_layout(taken.path)
                check_contents(taken.path, sizes)
                before = snapshot(taken.path)
                digest, files = hash_tree(taken.path, sizes, self.stop.check)
                if snapshot(taken.path) != before:
                    raise DropChanged("it changed while it was hashed")
        except DropRejected as rej:
            self.disposal.quarantine(taken, "-", rej, self.store.current())
            return Outcome.QUARANTINED
        except (DropChanged, FileNotFoundError) as err:
            logger.info("Drop %s is still being written (%s); waiting for it to settle.", printable(taken.name), err)
            return Outcome.WAITING
        except OSError as err:
            rej = DropRejected("layout", f"cannot read the drop: {printable(first_line(err))}")
            self.disposal.quarantine(taken, "-", rej, self.store.current())
            return Outcome.QUARANTINED
        return digest, files, before

    def _duplicate(self, taken: TakenDrop, digest: str, earlier: dict) -> Outcome:
        logger.info("Drop %s [%s] has the content of %s, merged as %s; nothing to do.", printable(taken.name),
                    digest[:12], printable(str(earlier.get("drop"))), earlier.get("version"))
        self.store.ledger.append(Result.DUPLICATE, hash=digest, drop=taken.name, task=earlier.get("task"),
                                 version=earlier.get("version"))
        self.disposal.retire(taken.path, taken.name, digest, taken.ident)
        self.metrics.duplicates.inc()
        return Outcome.DUPLICATE

    def _space_for(self, taken: TakenDrop, digest: str, parent: str) -> bool:
        need = int(dir_size(self.store.version_dir(parent)) * self.config.space_factor)
        free = free_bytes(self.store.versions_dir)
        if free >= need:
            return True
        factor = self.config.space_factor
        self.disposal.defer(taken.key, taken.name, digest, "no_space", f"{free / 2**20:.1f} MiB free in "
                            f"{self.store.versions_dir}, about {need / 2**20:.1f} MiB needed ({factor} x the live "
                            "version); free space or prune versions (--keep).")
        return False

    def _merge(self, taken: TakenDrop, digest: str, info: DropInfo, parent: str, snap) -> Outcome:
        t0 = time.monotonic()
        entry = self.publisher.begin(taken, digest, info.task, parent)
        self.set_state(f"merging {printable(taken.name)} into {entry.version}")
        try:
            with self.stop.interruptible():
                self.publisher.build(entry, taken, info)
                if snapshot(taken.path) != snap:
                    raise DropChanged("it changed while it was merged")
            entry = self.publisher.seal(entry, t0)
        except BaseException as err:  # noqa: BLE001 - every failure before `merged` abandons the staging dir
            self._abandon(entry)
            return self._merge_failed(taken, digest, parent, entry, err)
        if not self.publisher.publish(entry):
            self._abandon(entry)
            return Outcome.REQUEUED
        self.finish(entry)
        return Outcome.MERGED

    def _abandon(self, entry: JournalEntry) -> None:
        self.publisher.abandon(entry)
        self.set_state("idle")

    def _merge_failed(self, taken: TakenDrop, digest: str, parent: str, entry: JournalEntry,
                      err: BaseException) -> Outcome:
        if isinstance(err, StopRequested):
            logger.warning("Stopped while merging drop %s [%s]; nothing published, it is merged on the next start.",
                           printable(taken.name), digest[:12])
            return Outcome.STOPPED
        if isinstance(err, DropChanged):
            logger.warning("Drop %s [%s]: %s; it is hashed and merged again.", printable(taken.name), digest[:12], err)
            return Outcome.REQUEUED
        if isinstance(err, OSError) and is_space_error(err):
            self.disposal.defer(taken.key, taken.name, digest, "no_space",
                                f"no space while staging {entry.staging}: {first_line(err)}")
            return Outcome.DEFERRED
        if not isinstance(err, Exception):
            raise err
        rej = err if isinstance(err, DropRejected) else DropRejected("merge", f"{type(err).__name__}: "
                                                                              f"{first_line(err)}")
        logger.debug("Merge of %s failed", printable(taken.name), exc_info=err)
        self.disposal.quarantine(taken, digest, rej, parent)
        return Outcome.QUARANTINED

    def finish(self, entry: JournalEntry, recovering: bool = False) -> None:
        """Bookkeeping after `current` switched; every step may run twice (after a crash) without harm."""
        self.publisher.record(entry)
        path = Path(entry.drop_path)
        if path.parent == self.store.incoming_dir:
            self.disposal.retire(path, entry.drop, entry.hash, path.name)
        self.store.prune(self.config.keep)
        now = time.time()
        self.metrics.last_success.set(now)
        self.last_success = {"drop": entry.drop, "hash": entry.hash, "task": entry.task, "version": entry.version,
                             "time": now_iso(), "unix": now, "merge_seconds": entry.merge_seconds}
        self.publisher.complete(entry)
        logger.info("Drop %s [%s] (task %r) is live as %s (%.1fs)", printable(entry.drop), entry.hash[:12],
                    entry.task, entry.version, entry.merge_seconds)
        self.set_state("idle")

    # -- status --------------------------------------------------------------------------------------------------
    def set_state(self, state: str) -> None:
        self.state = state
        self.write_status()

    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "state": self.state,
            "current": self.store.current(),
            "versions": self.store.versions(),
            "queue": self.queue,
            "writing": self.writing,
            "deferred": sorted(self.deferred),
            "last_error": self.last_error,
            "last_success": self.last_success,
            "hooks": self.publisher.notifier.outcomes[-5:],  # the serving hooks' latest results (background)
            "gates": self.publisher.gate_status(),  # promotion gates as configured, and the last decision
            "drop_dir": str(self.drop_dir),
            "deploy_dir": str(self.store.root),
            "watcher": self.watcher,
            "metrics_port": self.metrics_port,
            "started": self.started,
        }

    def write_status(self) -> None:
        """Rewrite `status.json` and `metrics.prom` when something changed (an idle daemon writes nothing)."""
        status = self.status()
        if status == self._status_written:
            return
        live = status["current"]
        if live:
            self.metrics.current_version.set(int(live[1:]))
            self.metrics.set_divergence(self.store.version_info(live).get("divergence") or {})
        self.store.write_status({**status, "updated": now_iso()})
        self.metrics.write_textfile()
        self._status_written = status
