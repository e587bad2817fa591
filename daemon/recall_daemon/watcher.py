"""File events of the drop folder, as hints only: they wake the worker, which then rescans (RELIABILITY rule 1).

inotify by default; watchdog's `PollingObserver` on request (network filesystems, where inotify sees nothing) or
when inotify cannot start (watch limit reached, no inotify). Events may be duplicated, late or lost; the
worker's periodic rescan is what guarantees no drop is missed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_OPENED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

logger = logging.getLogger(__name__)

# Reads (the daemon's own hashing included) are not news.
IGNORED_EVENTS = {EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE}


class WakeHandler(FileSystemEventHandler):
    def __init__(self, wake: threading.Event):
        self.wake = wake
        self.events = 0

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in IGNORED_EVENTS:
            return
        self.events += 1
        self.wake.set()


class DropWatcher:
    """Runs a watchdog observer over the drop folder; every relevant event sets `wake`."""

    def __init__(self, drop_dir: Path, wake: threading.Event, polling: bool = False, poll_interval: float = 2.0):
        self.drop_dir = Path(drop_dir)
        self.handler = WakeHandler(wake)
        self.polling = polling
        self.poll_interval = poll_interval
        self.observer = None

    @property
    def kind(self) -> str:
        return "polling" if self.polling else "inotify"

    def start(self) -> None:
        if not self.polling:
            try:
                self.observer = self._start(Observer())
                return
            except OSError as err:
                logger.warning("inotify watch of %s failed (%s); falling back to a polling observer. Raise "
                               "fs.inotify.max_user_watches or pass --polling-observer.", self.drop_dir, err)
                self.polling = True
        self.observer = self._start(PollingObserver(timeout=self.poll_interval))

    def _start(self, observer):
        observer.schedule(self.handler, str(self.drop_dir), recursive=True)
        observer.daemon = True
        observer.start()
        logger.info("Watching %s with %s", self.drop_dir, type(observer).__name__)
        return observer

    def healthy(self) -> bool:
        return self.observer is not None and self.observer.is_alive()

    def restart(self) -> None:
        """Restart a dead observer (e.g. the drop folder was deleted and recreated)."""
        self.stop()
        try:
            self.start()
        except OSError as err:
            logger.warning("Cannot watch %s (%s); relying on rescans every poll interval.", self.drop_dir, err)

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            if self.observer.is_alive():
                self.observer.join(timeout=5)
            self.observer = None
