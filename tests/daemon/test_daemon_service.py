"""The long-running daemon as a process: live pickup through file events, signals, one instance, a burst of drops.

The live-pickup test runs `python -m recall_daemon` exactly as systemd would; the others fork the test process
(a real child process with its own signals and locks, without paying the interpreter start-up again).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest
from daemon_helpers import assert_consistent, make_drop, wait_exit

from recall_daemon import cli
from recall_daemon.faults import FAULT_ENV
from recall_daemon.intake import Intake
from recall_daemon.journal import INTENT

pytest_plugins = ["daemon_fixtures"]


def add_atomically(dep, name: str, seed: int) -> None:
    """Build a drop under a work-in-progress name, READY inside, and rename it in whole (what producers do)."""
    make_drop(dep.drop, f".{name}.tmp-1", dep.base, seed=seed)
    os.rename(dep.drop / f".{name}.tmp-1", dep.drop / name)


def test_live_drop_is_picked_up_by_inotify_events(deployment):
    """Not --once: a running daemon (poll 120 s, so only an event can wake it) publishes a new drop in seconds."""
    dep = deployment
    proc = dep.spawn("--poll", "120", "--metrics-port", "0", "--quiet-period", "600")
    try:
        status = dep.wait_for(lambda: dep.status().get("pid") == proc.pid and dep.status().get("state") == "idle"
                              and dep.status(), proc=proc, what="the daemon to start", timeout=90)
        assert status["watcher"] == "inotify"
        time.sleep(0.3)
        t0 = time.monotonic()
        add_atomically(dep, "live", seed=7)
        dep.wait_for(lambda: dep.store.current() == "v0001", proc=proc, what="the drop to go live", timeout=60)
        latency = time.monotonic() - t0
        print(f"drop-to-live latency: {latency:.2f}s")
        assert latency < 60  # far below the 120 s poll: the event woke the worker
        dep.wait_for(lambda: (dep.status().get("last_success") or {}).get("drop") == "live", proc=proc,
                     what="the bookkeeping")
        port = dep.status()["metrics_port"]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "recall_daemon_drops_ingested_total 1.0" in body and "recall_daemon_current_version 1.0" in body
    finally:
        rc = dep.stop(proc)
    assert rc == 0, dep.logs()
    assert dep.status()["state"] == "stopped"
    assert "[" in dep.logs() and "is live as v0001" in dep.logs()
    assert_consistent(dep, merged=["live"])


def test_live_drop_is_picked_up_by_the_polling_observer(deployment):
    dep = deployment
    pid = dep.fork_daemon(poll=2.0, polling_observer=True)
    try:
        dep.wait_for(lambda: dep.status().get("pid") == pid and dep.status().get("state") == "idle",
                     what="the daemon to start")
        assert dep.status()["watcher"] == "polling"
        add_atomically(dep, "polled", seed=8)
        dep.wait_for(lambda: dep.store.current() == "v0001", what="the drop to go live", timeout=60)
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_exit(pid) == 0
    assert_consistent(dep, merged=["polled"])


def test_sigterm_mid_merge_exits_0_and_leaves_nothing_half_done(deployment):
    dep = deployment
    dep.add("alpha", seed=1)
    pid = dep.fork_daemon(env={FAULT_ENV: "slow-merge"}, poll=60.0)
    try:
        dep.wait_for(lambda: dep.store.journal.read().state == INTENT and list(dep.store.versions_dir.glob("*.tmp-*")),
                     what="the merge to start")
        time.sleep(0.3)  # inside the (slowed) shard write
    finally:
        os.kill(pid, signal.SIGTERM)
        rc = wait_exit(pid, timeout=30)
    assert rc == 0
    store = dep.store
    assert store.journal.read().state == "idle" and store.current() == "v0000"
    assert dep.ledger("merged") == [] and not (dep.drop / "alpha").exists()
    assert [t.name for t in Intake(store.incoming_dir).taken()] == ["alpha"]  # taken, merged on the next start
    assert dep.status()["state"] == "stopped"
    assert dep.run_once() == 0  # the next start merges it, once
    assert_consistent(dep, merged=["alpha"])


def test_second_instance_is_refused(deployment, capsys):
    dep = deployment
    pid = dep.fork_daemon(poll=60.0)
    try:
        dep.wait_for(lambda: dep.status().get("pid") == pid and dep.status().get("state") == "idle",
                     what="the daemon to start")
        rc = cli.main(["daemon", "--drop", str(dep.drop), "--deploy", str(dep.deploy), "--once"])
        assert rc == 2
        err = capsys.readouterr().err
        assert f"another recall-daemon (pid {pid})" in err and "daemon.lock" in err
        assert cli.main(["status", "--deploy", str(dep.deploy), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["running"] is True and report["pid"] == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_exit(pid) == 0
    assert_consistent(dep)


@pytest.mark.parametrize("events", [False, True], ids=["rescan_only", "inotify"])
def test_burst_of_20_drops_all_merged_once_in_order(deployment, events):
    """A burst of drops while the daemon runs: every one merged once, in arrival order; with events off the periodic
    rescan alone finds them, with inotify (and a long poll) the events and the rescan after each drop do."""
    dep = deployment
    pid = dep.fork_daemon(poll=60.0 if events else 0.3, events=events, keep=2)
    names = [f"task{i:02d}" for i in range(20)]
    try:
        dep.wait_for(lambda: dep.status().get("pid") == pid and dep.status().get("state") == "idle",
                     what="the daemon to start")
        assert dep.status()["watcher"] == ("inotify" if events else "rescan-only")
        for i, name in enumerate(names):
            dep.add(name, seed=100 + i, scale=0.02)
        dep.wait_for(lambda: len(dep.ledger("merged")) == 20, what="20 merges", timeout=240)
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_exit(pid) == 0
    assert [e["drop"] for e in dep.ledger("merged")] == names
    live = dep.store.current()
    assert live == "v0020"
    assert [t["name"] for t in dep.store.version_info(live)["tasks"]] == names
    assert dep.store.versions() == ["v0000", "v0019", "v0020"]
    assert_consistent(dep, merged=names)


def test_inotify_failure_falls_back_to_polling(tmp_path, monkeypatch):
    import threading

    import recall_daemon.watcher as watcher

    class Broken:
        def __init__(self, *a, **k):
            pass

        def schedule(self, *a, **k):
            raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(watcher, "Observer", Broken)
    wake = threading.Event()
    w = watcher.DropWatcher(tmp_path, wake, polling=False, poll_interval=0.1)
    w.start()
    try:
        assert w.kind == "polling" and w.healthy()
        (tmp_path / "new").mkdir()
        assert wake.wait(5)
    finally:
        w.stop()


@pytest.mark.parametrize("polling", [False, True])
def test_watcher_events_only_wake(tmp_path, polling):
    import threading

    from recall_daemon.watcher import DropWatcher

    wake = threading.Event()
    w = DropWatcher(tmp_path, wake, polling=polling, poll_interval=0.1)
    w.start()
    try:
        time.sleep(0.2)
        wake.clear()
        (tmp_path / "drop").mkdir()
        (tmp_path / "drop" / "READY").touch()
        assert wake.wait(5)
    finally:
        w.stop()
