"""recall_daemon: the drop-folder daemon of recall-hf (SPEC 1, 3; RELIABILITY.md).

It watches a drop folder for task checkpoints and folds each one into the deployed model with RECALL, publishing
an immutable version and switching `DEPLOY/current` atomically, so the deployed model is always complete, loadable
and validated, and every complete drop is merged exactly once or quarantined with a reason.

Modules, in the order a drop meets them:
    watcher.py     file events (inotify, or polling) that only wake the worker
    drops.py       completeness (READY / quiet period), arrival order
    intake.py      a drop is untrusted: lstat-only layout and code checks, taking it into incoming/, bounded hashing
    validation.py  checks before merging and before going live
    worker.py      one drop at a time: take -> check -> merge -> publish -> retire; status
    publisher.py   the journaled publish (intent -> merged -> published -> idle), the base as v0000
    gate.py        promotion gates (fingerprint regression, --gate CMD) and per-task retention records
    disposal.py    where a drop goes: retire, quarantine (in place), leave, defer
    recovery.py    bringing the deploy folder back after a crash
    journal.py     the publish journal (intent -> merged -> published)
    ledger.py      the append-only ledger of every drop handled
    stop.py        SIGTERM/SIGINT: the stop token and interruptible stretches
    store.py       the deploy folder: versions, current, quarantine, status, rollback, pruning
    modelcard.py   version.json and the cumulative model card README.md
    metrics.py     Prometheus metrics (textfile and HTTP)
    service.py     lock, signals, the main loop
    cli.py         `recall-hf daemon | status | rollback`
    faults.py      fault injection for the test suite (environment variables)
"""

from __future__ import annotations

__all__ = ["DaemonConfig", "DaemonService", "DeployStore"]
_MODULES = {"DaemonConfig": "config", "DaemonService": "service", "DeployStore": "store"}


def __getattr__(name: str):
    # Loaded on first use: `recall-hf --help` imports this package (for its commands) and must stay fast.
    if name not in _MODULES:
        raise AttributeError(f"module 'recall_daemon' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
