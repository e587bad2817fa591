"""Fault injection for the test suite: crash (SIGKILL) at a named point, or fail staging writes with ENOSPC.

Inactive unless an environment variable asks for it, so a production daemon never pays for it:

- `RECALL_DAEMON_CRASH_AT=<point>` kills the process with SIGKILL (a real `kill -9`: no cleanup, no `finally`) at
  one of `CRASH_POINTS`, e.g. `renamed` = after `versions/vNNNN` was renamed into place, before `current` switched.
- `RECALL_DAEMON_FAULT=enospc` makes every safetensors shard write of a merge fail with `ENOSPC`;
  `RECALL_DAEMON_FAULT=slow-merge` sleeps inside the merge (to deliver a signal mid-merge).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

CRASH_ENV = "RECALL_DAEMON_CRASH_AT"
FAULT_ENV = "RECALL_DAEMON_FAULT"
# In the order a publish passes them.
CRASH_POINTS = ("intent", "shard-write", "merged", "renamed", "switched", "published", "ledger")
FAULTS = ("enospc", "slow-merge")


def crash_point(name: str) -> None:
    """SIGKILL this process when `RECALL_DAEMON_CRASH_AT` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        logger.critical("Fault injection: SIGKILL at %r", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def injected_faults() -> Iterator[None]:
    """Patch the merge's shard writer while the daemon runs when the environment asks for a write fault."""
    crash, fault = os.environ.get(CRASH_ENV), os.environ.get(FAULT_ENV)
    if crash and crash not in CRASH_POINTS:
        raise ValueError(f"{CRASH_ENV}={crash!r} is not a crash point; choose one of {', '.join(CRASH_POINTS)}.")
    if fault and fault not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={fault!r} is not a fault; choose one of {', '.join(FAULTS)}.")
    if crash != "shard-write" and not fault:
        yield
        return
    from recall_hf.safetensors_io import StreamingWriter

    original = StreamingWriter.write

    def write(self, name, tensor):
        if fault == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV}=enospc)")
        if fault == "slow-merge":
            time.sleep(30)
        original(self, name, tensor)
        if crash == "shard-write":
            self._file.flush()  # a partial shard on disk, as a real crash mid-write leaves it
            crash_point("shard-write")

    logger.warning("Fault injection active: %s=%s %s=%s", CRASH_ENV, crash, FAULT_ENV, fault)
    StreamingWriter.write = write
    try:
        yield
    finally:
        StreamingWriter.write = original
