"""The worker: one drop at a time, verify -> merge -> validate -> publish, every step journaled; and recovery.

A drop's way through (RELIABILITY rules 2-7, 9, 12):

1. content hash (a drop whose content is already in the ledger is a no-op, whatever its name);
2. `verify_drop` (index vs shards, every tensor read and finite, sha256 vs `recall.json`, architecture, samples);
   a failure quarantines the drop;
3. free-space check, journal `intent`, RECALL merge into `versions/vNNNN.tmp-<pid>/`, model card, post-merge
   validation (loads, forward pass finite), fsync, journal `merged`;
4. under `publish.lock`: rename to `versions/vNNNN`, fsync the folder, switch `current`; journal `published`;
5. bookkeeping: ledger line, the drop leaves the drop folder, old versions pruned, journal `idle`.

Disk full (ENOSPC, EDQUOT) anywhere in 3 removes the staging dir and defers the drop (retried after `retry_after`,
the queue waits): it is not the drop's fault, so it is not quarantined. A rollback during a merge is noticed at
step 4 (`current` no longer points at the version merged from): the staged version is discarded and the drop is
merged again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from recall_hf.durable import apply_umask, fsync_dir, fsync_tree, write_json
from recall_hf.merge import recall_merge
from recall_hf.modeldir import NOT_COPIED, RECALL_JSON, is_adapter_dir, read_recall_json, weight_hashes
from recall_hf.samples import read_texts

from .config import DaemonConfig
from .drops import HIDDEN_INGESTED, HIDDEN_QUARANTINE, DropState, content_hash, scan, snapshot
from .faults import crash_point
from .journal import IDLE, INTENT, MERGED, PUBLISHED, JournalEntry
from .metrics import Metrics
from .modelcard import version_info, weight_summary, write_version_files
from .store import REASON_NAME, TMP_MARK, DeployStore, dir_size, free_bytes, move_tree, now_iso, unique_path
from .validation import DropRejected, drop_kind, first_line, open_weights, validate_version, verify_drop

logger = logging.getLogger(__name__)

MERGED_OK, DUPLICATE, QUARANTINED, DEFERRED, STOPPED, REQUEUED, WAITING, GONE = (
    "merged", "duplicate", "quarantined", "deferred", "stopped", "requeued", "waiting", "gone")
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
SMOKE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!"]


def recorded_hashes(version: Path) -> dict[str, str]:
    """The weight-file sha256 a version recorded in its `recall.json` when it was written; `{}` if unreadable."""
    try:
        hashes = read_recall_json(version).get("sha256")
    except (OSError, ValueError):
        return {}
    return hashes if isinstance(hashes, dict) else {}


class StopRequested(BaseException):
    """Raised at a safe point (or inside an interruptible merge) after SIGTERM/SIGINT; a BaseException so that
    no `except Exception` on the way swallows it."""


class StopToken:
    """Stop flag shared by the signal handlers, the watcher and the worker."""

    def __init__(self):
        self.requested = False
        self.wake = threading.Event()
        self._interruptible = False

    def request(self) -> None:
        """Called from a signal handler: stop now if the main thread is inside an interruptible merge."""
        self.requested = True
        self.wake.set()
        if self._interruptible and threading.current_thread() is threading.main_thread():
            self._interruptible = False
            raise StopRequested()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch (the merge, the validation) a stop may cut short: nothing in it is visible until publish."""
        if self.requested:
            raise StopRequested()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False


class Worker:
    """Processes drops for one deploy folder. Not thread-safe: exactly one worker per deploy (`daemon.lock`)."""

    def __init__(self, config: DaemonConfig, store: DeployStore, metrics: Metrics, stop: StopToken | None = None):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.stop = stop or StopToken()
        self.drop_dir = Path(config.drop_dir)
        self.deferred: dict[str, float] = {}
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
        self._status_written: dict | None = None
        self._probe_texts: list[str] | None = None

    # -----------------------------------------------------------------------------------------------------------------
    # Startup.
    # -----------------------------------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Bring the deploy folder back to a consistent state after whatever stopped the last run."""
        self.store.ensure_layout()
        self.drop_dir.mkdir(parents=True, exist_ok=True)
        if self.config.probes:
            self._probe_texts = read_texts(self.config.probes)
        self.store.repair_ledger()
        entry = self.store.journal.read()
        if entry.state == INTENT:
            logger.warning("Recovering: the merge of drop %s [%s] into %s was interrupted; discarding its staging dir "
                           "(the drop is merged again).", entry.drop, entry.hash[:12], entry.version)
            self._discard(entry)
        elif entry.state == MERGED:
            logger.warning("Recovering: drop %s [%s] was merged as %s but not published; publishing it now.",
                           entry.drop, entry.hash[:12], entry.version)
            if self._publish(entry, recovering=True):
                self._finish(entry, recovering=True)
            else:
                self._discard(entry, remove_version=True)
        elif entry.state == PUBLISHED:
            logger.warning("Recovering: drop %s [%s] is live as %s; finishing its bookkeeping.",
                           entry.drop, entry.hash[:12], entry.version)
            self._finish(entry, recovering=True)
        self.store.remove_stale()
        self._restore_hidden_drops()
        live = self.store.resolve_current()
        if live is not None:
            self._reconcile_ledger(live)

    def _restore_hidden_drops(self) -> None:
        for p in sorted(self.drop_dir.iterdir()):
            if p.name.startswith(HIDDEN_QUARANTINE):
                original = unique_path(self.drop_dir / p.name[len(HIDDEN_QUARANTINE):])
                logger.warning("Recovering: %s was being quarantined; putting it back as %s to check it again.",
                               p.name, original.name)
                os.rename(p, original)
            elif p.name.startswith(HIDDEN_INGESTED):
                logger.warning("Recovering: finishing the removal of the ingested drop %s.", p.name)
                self._dispose(p, p.name[len(HIDDEN_INGESTED):], None)

    def _reconcile_ledger(self, live: str) -> None:
        """Every drop in the live version's lineage has its `merged` ledger line (repairs a lost journal)."""
        merged = self.store.merged_hashes()
        for task in self.store.version_info(live).get("tasks", []):
            if task.get("hash") and task["hash"] not in merged:
                logger.warning("Ledger lacks drop %s [%s] of live version %s; adding it.", task.get("name"),
                               task["hash"][:12], task.get("version"))
                self.store.append_ledger({"hash": task["hash"], "drop": task.get("name"), "task": task.get("task"),
                                          "version": task.get("version"), "result": "merged", "recovered": True})

    def initialise(self) -> str:
        """Make sure there is a live version: keep the existing one, or copy `--base` to `versions/v0000`."""
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
        return self._publish_base(Path(self.config.base))

    def _publish_base(self, base: Path) -> str:
        if not base.is_dir():
            raise ValueError(f"--base {base} is not a directory.")
        try:
            kind = drop_kind(base)
            open_weights(base, kind)
        except DropRejected as rej:
            raise ValueError(f"--base {base} is not a usable model: {rej.message}") from None
        stage = self.store.versions_dir / f"v0000{TMP_MARK}{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            for p in sorted(base.iterdir()):
                if p.is_file() and p.name not in NOT_COPIED and not p.name.startswith("."):
                    shutil.copy2(p, stage / p.name)
            created = now_iso()
            write_json(stage / RECALL_JSON, {"kind": "recall-daemon-base", "task_count": 0,
                                             "source": str(base.resolve()), "created": created,
                                             "sha256": weight_hashes(stage)})
            write_version_files(stage, version_info("v0000", None, created, 0, [], "base", str(base.resolve())))
            try:
                validate_version(stage, self._probe_texts or SMOKE_TEXTS, self.config.validate_samples,
                                 self.config.recall.max_length, self.config.recall.device,
                                 self.config.recall.device_map)
            except DropRejected as rej:
                raise ValueError(f"--base {base} fails validation: {rej.message}") from None
            apply_umask(stage)  # copied base files keep their modes (transformers writes weights 0600)
            fsync_tree(stage)
            os.rename(stage, self.store.version_dir("v0000"))
            fsync_dir(self.store.versions_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self.store.switch_current("v0000")
        self.store.append_ledger({"event": "init", "result": "init", "version": "v0000", "kind": kind,
                                  "source": str(base.resolve())})
        logger.info("Initialised %s with the base model %s as v0000 (%s).", self.store.root, base, kind)
        return "v0000"

    # -----------------------------------------------------------------------------------------------------------------
    # The queue.
    # -----------------------------------------------------------------------------------------------------------------
    def pending(self) -> tuple[list[DropState], float]:
        """Complete drops in arrival order that may be taken now, and the unix time something else becomes due.

        A drop deferred for lack of space blocks the queue until its retry time: later drops would hit the same
        wall, and arrival order is kept.
        """
        complete, writing = scan(self.drop_dir, self.config.quiet_period)
        now = time.time()
        names = {s.name for s in complete}
        self.deferred = {n: t for n, t in self.deferred.items() if n in names}
        self.queue, self.writing = [s.name for s in complete], [s.name for s in writing]
        self.metrics.queue.set(len(complete))
        self.metrics.waiting.set(len(writing))
        due = [s.ready_at for s in writing]
        if complete and self.deferred.get(complete[0].name, 0) > now:
            return [], min(due + [self.deferred[complete[0].name]])
        return complete, min(due, default=float("inf"))

    # -----------------------------------------------------------------------------------------------------------------
    # One drop.
    # -----------------------------------------------------------------------------------------------------------------
    def process(self, drop: DropState) -> str:
        """Take one complete drop all the way: no-op, quarantine, deferral, or a new live version."""
        path = drop.path
        try:
            before = snapshot(path)
            digest, files = content_hash(path)
            if snapshot(path) != before:
                logger.info("Drop %s changed while it was hashed; waiting for it to settle.", path.name)
                return WAITING
        except FileNotFoundError:
            logger.info("Drop %s vanished before it was taken.", path.name)
            return GONE
        except OSError as err:  # unreadable (permissions, I/O error): it would block the queue forever
            self._quarantine(path, "-", DropRejected("layout", f"cannot read the drop: {first_line(err)}"), None)
            return QUARANTINED
        logger.info("Drop %s [sha256 %s] (%s) taken", path.name, digest[:12], drop.why)

        earlier = self.store.merged_hashes().get(digest)
        if earlier is not None:
            return self._duplicate(path, digest, earlier)

        parent = self.store.resolve_current()
        if parent is None:
            raise RuntimeError(f"No usable live version in {self.store.root}; cannot merge {path.name}.")
        parent_dir = self.store.version_dir(parent)
        self.set_state(f"verifying {path.name}")
        try:
            info = verify_drop(path, parent_dir, files, self.config.probes)
        except DropRejected as rej:
            self._quarantine(path, digest, rej, parent)
            return QUARANTINED

        need = int(dir_size(parent_dir) * self.config.space_factor)
        free = free_bytes(self.store.versions_dir)
        if free < need:
            self._defer(path.name, digest, "no_space", f"{free / 2**20:.1f} MiB free in {self.store.versions_dir}, "
                        f"about {need / 2**20:.1f} MiB needed ({self.config.space_factor} x the live version); free "
                        "space or prune versions (--keep).")
            return DEFERRED

        version = self.store.next_version()
        stage = self.store.versions_dir / f"{version}{TMP_MARK}{os.getpid()}"
        entry = JournalEntry(INTENT, drop=path.name, drop_path=str(path), hash=digest, task=info.task,
                             version=version, parent=parent, staging=str(stage), started=now_iso())
        t0 = time.monotonic()
        self.set_state(f"merging {path.name} into {version}")
        entry = self.store.journal.write(entry)
        crash_point("intent")
        try:
            with self.stop.interruptible():
                self._build_version(stage, parent, path, info, digest, version)
            fsync_tree(stage)
            entry = self.store.journal.write(entry.advance(MERGED, merge_seconds=round(time.monotonic() - t0, 3)))
            crash_point("merged")
        except StopRequested:
            logger.warning("Stopped while merging drop %s [%s]; nothing published, it is merged on the next start.",
                           path.name, digest[:12])
            self._discard(entry)
            return STOPPED
        except DropRejected as rej:
            self._discard(entry)
            self._quarantine(path, digest, rej, parent)
            return QUARANTINED
        except OSError as err:
            self._discard(entry)
            if not path.exists():
                logger.warning("Drop %s vanished while it was merged.", path.name)
                return GONE
            if err.errno not in SPACE_ERRNOS:
                self._quarantine(path, digest, DropRejected("merge", f"{type(err).__name__}: {first_line(err)}"),
                                 parent)
                return QUARANTINED
            self._defer(path.name, digest, "no_space", f"no space while staging {version}: {first_line(err)}")
            return DEFERRED
        except Exception as err:  # noqa: BLE001 - a merge failure rejects the drop; the daemon goes on
            logger.debug("Merge of %s failed", path.name, exc_info=True)
            self._discard(entry)
            self._quarantine(path, digest, DropRejected("merge", f"{type(err).__name__}: {first_line(err)}"), parent)
            return QUARANTINED

        if not self._publish(entry):
            self._discard(entry)
            return REQUEUED
        self._finish(entry)
        return MERGED_OK

    def _build_version(self, stage: Path, parent: str, drop: Path, info, digest: str, version: str) -> None:
        """Merge, card and validate into the staging dir; raises on anything that must keep it from going live."""
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        work = stage / "merged"
        # Task-vector fusion measures every task vector from the base (v0000): only for drops fine-tuned from it.
        base = self.store.version_dir("v0000") if self.config.recall.fusion == "task_vector" else None
        if base is not None and is_adapter_dir(drop):
            base = None  # adapter merges take their base from adapter_config.json
        # Hashes already known: the drop's were computed while it was verified; every version records its own in
        # recall.json when the daemon writes it (versions are immutable). The report need not hash them again.
        parent_dir = self.store.version_dir(parent)
        known = {str(d): recorded_hashes(d) for d in [parent_dir] + ([base] if base else [])}
        known[str(drop)] = info.weight_hashes
        report = recall_merge([parent_dir, drop], info.texts, work, self.config.recall, base=base, progress=False,
                              known_hashes=known)
        for p in work.iterdir():
            os.rename(p, stage / p.name)
        work.rmdir()
        created = now_iso()
        tasks = list(self.store.version_info(parent).get("tasks", []))
        tasks.append({"task": info.task, "name": drop.name, "hash": digest, "time": created, "version": version,
                      "weights": weight_summary(report.weights)})
        write_version_files(stage, version_info(version, parent, created, report.output_task_count, tasks,
                                                f"merge-{report.kind}"))
        self.set_state(f"validating {version}")
        result = validate_version(stage, info.texts, self.config.validate_samples, self.config.recall.max_length,
                                  self.config.recall.device, self.config.recall.device_map)
        logger.info("Version %s validated: forward pass on %d typical samples is finite", version, result["texts"])

    def _publish(self, entry: JournalEntry, recovering: bool = False) -> bool:
        """Rename the staged version into place and switch `current`; False when `current` moved meanwhile."""
        stage, final = Path(entry.staging), self.store.version_dir(entry.version)
        with self.store.publish_lock():
            live = self.store.current()
            if live != entry.version:
                if live not in (entry.parent, None):
                    logger.warning("`current` moved from %s to %s while %s was merged (a rollback?); the drop %s "
                                   "is merged again into %s.", entry.parent, live, entry.version, entry.drop, live)
                    return False
                if not final.exists():
                    if not stage.is_dir():
                        logger.warning("Neither %s nor its staging dir exists; the drop %s is merged again.",
                                       final, entry.drop)
                        return False
                    os.rename(stage, final)
                    fsync_dir(self.store.versions_dir)
                crash_point("renamed")
                self.store.switch_current(entry.version)
                crash_point("switched")
        self.store.journal.write(entry.advance(PUBLISHED))
        crash_point("published")
        if recovering:
            logger.info("Recovered: %s is live.", entry.version)
        return True

    def _finish(self, entry: JournalEntry, recovering: bool = False) -> None:
        """Bookkeeping after `current` switched; every step may run twice (after a crash) without harm."""
        new = entry.hash not in self.store.merged_hashes()
        if new:
            self.store.append_ledger({"hash": entry.hash, "drop": entry.drop, "task": entry.task,
                                      "version": entry.version, "parent": entry.parent, "result": "merged",
                                      "merge_seconds": entry.merge_seconds})
            self.metrics.ingested.inc()
            if entry.merge_seconds:
                self.metrics.merge_seconds.observe(entry.merge_seconds)
        crash_point("ledger")
        self._remove_drop(entry.drop, entry.hash, verify=recovering)
        self.store.prune(self.config.keep)
        now = time.time()
        self.metrics.last_success.set(now)
        self.last_success = {"drop": entry.drop, "hash": entry.hash, "task": entry.task, "version": entry.version,
                             "time": now_iso(), "unix": now, "merge_seconds": entry.merge_seconds}
        self.store.journal.write(entry.advance(IDLE))
        logger.info("Drop %s [%s] (task %r) is live as %s (%.1fs)", entry.drop, entry.hash[:12], entry.task,
                    entry.version, entry.merge_seconds)
        self.set_state("idle")

    def _discard(self, entry: JournalEntry, remove_version: bool = False) -> None:
        """Undo an unpublished merge: remove its staging (and never-live version) dir, journal back to idle."""
        if entry.staging:
            shutil.rmtree(entry.staging, ignore_errors=True)
        final = self.store.versions_dir / entry.version if entry.version else None
        if remove_version and final is not None and final.is_dir() and self.store.current() != entry.version:
            doomed = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}.discarded")
            os.rename(final, doomed)
            fsync_dir(self.store.versions_dir)
            shutil.rmtree(doomed, ignore_errors=True)
        self.store.journal.write(entry.advance(IDLE))
        self.set_state("idle")

    # -----------------------------------------------------------------------------------------------------------------
    # Drops leaving the drop folder.
    # -----------------------------------------------------------------------------------------------------------------
    def _duplicate(self, path: Path, digest: str, earlier: dict) -> str:
        logger.info("Drop %s [%s] has the content of %s, merged as %s; nothing to do.", path.name, digest[:12],
                    earlier.get("drop"), earlier.get("version"))
        self.store.append_ledger({"hash": digest, "drop": path.name, "task": earlier.get("task"),
                                  "version": earlier.get("version"), "result": "duplicate"})
        self._remove_drop(path.name, digest)
        self.metrics.duplicates.inc()
        return DUPLICATE

    def _remove_drop(self, name: str, digest: str, verify: bool = False) -> None:
        """Take a handled drop out of the drop folder: first a rename to a hidden name (atomic, never rescanned)."""
        path, hidden = self.drop_dir / name, self.drop_dir / f"{HIDDEN_INGESTED}{name}"
        if path.is_dir():
            if verify and content_hash(path)[0] != digest:
                logger.warning("Drop folder %s now holds different content; leaving it to be processed.", path)
            else:
                if hidden.exists():
                    shutil.rmtree(hidden)
                os.rename(path, hidden)
                fsync_dir(self.drop_dir)
        if hidden.exists():
            self._dispose(hidden, name, digest)

    def _dispose(self, hidden: Path, name: str, digest: str | None) -> None:
        if self.config.after_ingest == "move":
            digest = digest or content_hash(hidden)[0]
            dest = self.store.ingested_dir / f"{name}-{digest[:12]}"
            if dest.exists():
                shutil.rmtree(hidden)
            else:
                self.store.ingested_dir.mkdir(exist_ok=True)
                move_tree(hidden, dest)
        else:
            shutil.rmtree(hidden)

    def _quarantine(self, path: Path, digest: str, rej: DropRejected, parent: str | None) -> None:
        name = path.name
        hidden = self.drop_dir / f"{HIDDEN_QUARANTINE}{name}"
        try:
            os.rename(path, hidden)
        except FileNotFoundError:
            logger.warning("Drop %s vanished before it could be quarantined (%s).", name, rej)
            return
        dest = unique_path(self.store.quarantine_dir / name)
        tmp = self.store.quarantine_dir / f"{dest.name}{TMP_MARK}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        move_tree(hidden, tmp)
        reason = {"drop": name, "hash": digest, "check": rej.check, "error": rej.message, "time": now_iso(),
                  "deployed_version": parent,
                  "hint": "Fix the checkpoint and drop it again under any name; this copy is kept for inspection."}
        write_json(tmp / REASON_NAME, reason)
        os.rename(tmp, dest)
        fsync_dir(self.store.quarantine_dir)
        self.store.append_ledger({"hash": digest, "drop": name, "result": "quarantined", "check": rej.check,
                                  "error": rej.message, "quarantine": dest.name})
        self.metrics.quarantined.labels(rej.check).inc()
        self.last_error = {"kind": "quarantined", "drop": name, "hash": digest, "check": rej.check,
                           "error": rej.message, "time": now_iso()}
        logger.error("Drop %s [%s] quarantined to %s: %s check failed: %s", name, digest[:12], dest, rej.check,
                     rej.message)

    def _defer(self, name: str, digest: str, reason: str, message: str) -> None:
        retry = time.time() + self.config.retry_after
        self.deferred[name] = retry
        self.metrics.deferred.labels(reason).inc()
        self.last_error = {"kind": reason, "drop": name, "hash": digest, "error": message, "time": now_iso(),
                           "retry_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(retry))}
        logger.error("Drop %s [%s] deferred (%s): %s; retrying in %.0fs. The live version is unchanged.", name,
                     digest[:12], reason, message, self.config.retry_after)

    # -----------------------------------------------------------------------------------------------------------------
    # Status.
    # -----------------------------------------------------------------------------------------------------------------
    def set_state(self, state: str) -> None:
        self.state = state
        self.write_status()

    def status(self) -> dict:
        live = self.store.current()
        return {
            "pid": os.getpid(),
            "state": self.state,
            "current": live,
            "versions": self.store.versions(),
            "queue": self.queue,
            "writing": self.writing,
            "deferred": sorted(self.deferred),
            "last_error": self.last_error,
            "last_success": self.last_success,
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
        self.store.write_status({**status, "updated": now_iso()})
        self.metrics.write_textfile()
        self._status_written = status
