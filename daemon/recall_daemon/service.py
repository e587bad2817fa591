"""The daemon process: one instance per deploy folder (lock), signals, the watcher, and the worker's loop.

The worker runs on the main thread: Python delivers signals there, so SIGTERM/SIGINT can cut a long merge short
(`StopToken.interruptible`) and everything else stops at the next safe point. The watcher's thread and the
metrics server's thread only ever set a flag or read counters.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import DaemonConfig
from .faults import injected_faults
from .intake import printable
from .metrics import Metrics
from .stop import StopRequested, StopToken
from .store import DeployStore, now_iso
from .watcher import DropWatcher
from .worker import Outcome, Worker

logger = logging.getLogger(__name__)

# Exit codes of `recall-hf daemon` (2, a bad setting or a second instance, comes from the command line).
EXIT_OK, EXIT_DEFERRED, EXIT_QUARANTINED = 0, 1, 3
# Outcomes that made no progress: the loop pauses (with backoff) before it looks again, so it never spins.
NO_PROGRESS = (Outcome.WAITING, Outcome.REQUEUED, Outcome.GONE)
# How often `--once` takes up the same drop before it leaves it for the next run.
ONCE_ATTEMPTS = 3
# After an event, let a burst of writes settle before rescanning.
EVENT_SETTLE_SECONDS = 0.2
LOCK_ATTEMPTS = 5


def lock_held(path: Path) -> bool:
    """Whether a live process holds the daemon lock (probed with a shared, non-blocking flock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def lock_holder(path: Path) -> int | None:
    """PID written in a lock file, if any."""
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class InstanceLock:
    """An exclusive `flock` on `daemon.lock` holding the owner's PID; the kernel drops it when the process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # `recall-hf status` probes the lock for an instant; only a lock held throughout means an owner.
                if attempt < LOCK_ATTEMPTS - 1:
                    time.sleep(0.1)
        else:
            os.close(fd)
            holder = lock_holder(self.path)
            raise RuntimeError(f"another recall-daemon (pid {holder or 'unknown'}) already serves "
                               f"{self.path.parent}: {self.path} is locked. Stop it first (e.g. systemctl stop "
                               "recall-daemon) or use another --deploy folder.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


class Backoff:
    """Pauses that double from `first` to `cap` seconds while nothing moves; `reset` after progress."""

    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap, self.current = first, cap, 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.first)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


def remove_created(paths: list[Path]) -> None:
    """Undo a failed start: remove the files and (empty) folders it created, deepest first."""
    for p in sorted(paths, key=lambda p: len(p.parts), reverse=True):
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


class DaemonService:
    """Runs the worker over one drop folder and one deploy folder until stopped (or once, with `once=True`)."""

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.store = DeployStore(config.deploy_dir)
        self.metrics = Metrics(self.store.metrics_path)
        self.stop = StopToken()
        self.worker = Worker(config, self.store, self.metrics, self.stop)
        self.watcher: DropWatcher | None = None
        self.backoff = Backoff(cap=max(1.0, min(config.poll, 30.0)))

    def _absent(self) -> list[Path]:
        s = self.store
        paths = [s.root, s.versions_dir, s.quarantine_dir, s.incoming_dir, Path(self.config.drop_dir), s.lock_path,
                 s.status_path, s.metrics_path, s.ledger.path, s.journal.path, s.publish_lock_path]
        return [p for p in paths if not os.path.lexists(p)]

    def run(self, once: bool = False) -> int:
        """Recover, initialise, then process drops; returns the exit code. A start that fails leaves nothing."""
        absent = self._absent()
        self.store.root.mkdir(parents=True, exist_ok=True)
        lock = InstanceLock(self.store.lock_path)
        try:
            lock.acquire()
        except BaseException:  # another instance owns everything here: only an empty root we made goes
            remove_created([p for p in absent if p == self.store.root])
            raise
        restore_signals = self._install_signals()
        started = False
        try:
            with injected_faults():
                self.worker.recover()
                live = self.worker.initialise()
                started = True
                logger.info("recall-daemon (pid %d): drops from %s, deploying to %s, live version %s",
                            os.getpid(), self.config.drop_dir, self.store.root, live)
                # Everything alive now (torch, transformers, modules) lives as long as the process: freezing it
                # keeps each full collection (recall_hf runs one per model load) from walking ~500k objects.
                gc.freeze()
                if once:
                    return self._run_once()
                return self._serve()
        except StopRequested:
            return EXIT_OK
        finally:
            gc.unfreeze()
            if self.watcher is not None:
                self.watcher.stop()
            self.metrics.close()
            self._finish_hooks()
            if started:
                self._final_status()
            restore_signals()
            lock.release()
            if not started:
                remove_created(absent)
            logger.info("recall-daemon stopped.")

    def _serve(self) -> int:
        """The long-running daemon: metrics server, file watcher, then the loop until a stop."""
        if self.config.metrics_port is not None:
            self.worker.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_addr)
        self.worker.watcher = "rescan-only"
        if self.config.events:
            self.watcher = DropWatcher(Path(self.config.drop_dir), self.stop.wake, self.config.polling_observer,
                                       max(0.5, min(self.config.poll / 4, 5.0)))
            try:
                self.watcher.start()
                self.worker.watcher = self.watcher.kind
            except OSError as err:
                logger.warning("Cannot watch %s (%s); relying on rescans every %.0fs.", self.config.drop_dir, err,
                               self.config.poll)
        return self._loop()

    def _finish_hooks(self) -> None:
        """A `--once` run (or a failure) waits, bounded by `hook_timeout`, for the serving hooks of what it published;
        a stop by signal does not wait (RELIABILITY rule 14)."""
        notifier = self.worker.publisher.notifier
        if self.stop.requested:
            notifier.close()
        else:
            notifier.finish(self.config.hook_timeout)

    def _final_status(self) -> None:
        try:
            self.worker.state = "stopped"
            self.worker.write_status()
        except OSError as err:
            logger.error("Cannot write the final status: %s", err)

    def _install_signals(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            logger.warning("Received %s; stopping at the next safe point.", signal.Signals(signum).name)
            self.stop.request()
            self.worker.publisher.notifier.close()  # no more hook retries; a running attempt ends with the process

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    def _sleep(self, seconds: float) -> bool:
        """Wait for an event, a stop or the timeout; True when woken by an event or a stop."""
        return self.stop.sleep(seconds)

    def _loop(self) -> int:
        while not self.stop.requested:
            self.stop.wake.clear()
            try:
                ready, due = self.worker.pending()
                if ready:
                    outcome = self.worker.process(ready[0])
                    if outcome in NO_PROGRESS:
                        self._sleep(self.backoff.next())
                    else:
                        self.backoff.reset()
                    continue
                self.worker.set_state("idle")
            except StopRequested:
                break
            except Exception as err:  # noqa: BLE001 - the service must outlive any one failure
                self._internal_error(err)
                continue
            if self.watcher is not None and not self.watcher.healthy():
                logger.warning("The file watcher died; restarting it.")
                self.watcher.restart()
            if self._sleep(min(self.config.poll, due - time.time())) and not self.stop.requested:
                time.sleep(EVENT_SETTLE_SECONDS)
        return EXIT_OK

    def _internal_error(self, err: Exception) -> None:
        pause = max(self.backoff.next(), min(self.config.poll, 30.0))
        logger.exception("Unexpected error; recovering the deploy folder, retrying in %.1fs", pause)
        self.worker.last_error = {"kind": "internal", "error": f"{type(err).__name__}: {err}", "time": now_iso()}
        try:
            self.worker.recover()
            self.worker.set_state("idle")
        except Exception:  # noqa: BLE001
            logger.exception("Recovery failed; retrying later")
        self._sleep(pause)

    def _run_once(self) -> int:
        """Process what is pending now; every drop is taken up at most ONCE_ATTEMPTS times, so this returns."""
        attempts: dict[tuple[str, str], int] = {}
        while not self.stop.requested:
            ready, _ = self.worker.pending()
            if not ready:
                break
            head = ready[0]
            mark = (head.key, getattr(head, "fingerprint", ""))
            attempts[mark] = attempts.get(mark, 0) + 1
            if attempts[mark] > ONCE_ATTEMPTS:
                logger.warning("Drop %s made no progress in %d attempts; leaving it for the next run.",
                               printable(head.name), ONCE_ATTEMPTS)
                break
            outcome = self.worker.process(head)
            if outcome == Outcome.DEFERRED:
                logger.error("Stopping: %s (see status.json).", (self.worker.last_error or {}).get("error"))
                return EXIT_DEFERRED
            if outcome in (Outcome.STOPPED, Outcome.WAITING):
                break
        if self.worker.deferred:
            return EXIT_DEFERRED
        if self.worker.writing:
            logger.info("Still being written (no READY, not quiet for %.0fs yet): %s", self.config.quiet_period,
                        ", ".join(self.worker.writing))
        self.worker.set_state("idle")
        return EXIT_QUARANTINED if self.worker.quarantined else EXIT_OK
