"""Stopping on SIGTERM/SIGINT within a second, whatever the daemon is doing (RELIABILITY rules 10, 14).

The signal handler sets a flag and wakes every wait. Inside an interruptible stretch (taking, hashing and checking
a drop, the merge, the validation: nothing in them is visible until publish) it raises `StopRequested` at once;
elsewhere the worker stops at the next safe point, which is never more than a short rename or fsync away.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class StopRequested(BaseException):
    """Raised at a safe point (or inside an interruptible stretch) after SIGTERM/SIGINT; a BaseException so that
    no `except Exception` on the way swallows it."""


class StopToken:
    """Stop flag shared by the signal handlers, the watcher and the worker."""

    def __init__(self):
        self.requested = False
        self.wake = threading.Event()
        self._interruptible = 0

    def request(self) -> None:
        """Called from a signal handler: stop now if the main thread is inside an interruptible stretch."""
        self.requested = True
        self.wake.set()
        if self._interruptible and threading.current_thread() is threading.main_thread():
            self._interruptible = 0
            raise StopRequested()

    def check(self) -> None:
        if self.requested:
            raise StopRequested()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stretch a stop may cut short: nothing in it is visible until publish (nesting allowed)."""
        self.check()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible = max(0, self._interruptible - 1)

    def sleep(self, seconds: float) -> bool:
        """Wait up to `seconds` for a wake-up (an event or a stop); True when woken."""
        return self.wake.wait(max(0.0, seconds))
