"""`kill -9` at every journal state and mid shard write (a real SIGKILL of a real daemon process), then a restart.

The daemon kills itself with SIGKILL at the point `RECALL_DAEMON_CRASH_AT` names (recall_daemon/faults.py), so
no `finally` or cleanup runs, exactly as with `kill -9`. The daemon runs in a child process: a fresh
`python -m recall_daemon` for one point, a fork of the test process (same code, no interpreter start-up) for the
others. After each crash `current` must still load; after the
restart there is no `*.tmp-*` left and the drop is merged exactly once.
"""

from __future__ import annotations

import signal

import pytest
from daemon_helpers import assert_consistent, forward_is_finite

from recall_daemon.faults import CRASH_ENV, CRASH_POINTS
from recall_daemon.journal import INTENT, MERGED, PUBLISHED

pytest_plugins = ["daemon_fixtures"]

JOURNAL_AT_CRASH = {"intent": INTENT, "shard-write": INTENT, "merged": MERGED, "renamed": MERGED,
                    "switched": MERGED, "published": PUBLISHED, "ledger": PUBLISHED}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_then_restart_merges_exactly_once(deployment, point):
    dep = deployment
    store = dep.store
    dep.add("alpha", seed=1)
    with_second = point in ("shard-write", "renamed")
    if with_second:
        dep.add("beta", seed=2)  # queued behind the crash: must follow, once, in order
    if point == "renamed":  # one through the command line in a fresh interpreter, the rest forked (faster)
        proc = dep.run_subprocess(**{CRASH_ENV: point})
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert dep.run_forked(**{CRASH_ENV: point}) == -signal.SIGKILL

    # Right after the crash: the journal holds the state reached, `current` is a complete version.
    assert store.journal.read().state == JOURNAL_AT_CRASH[point]
    live = store.current()
    assert live == ("v0001" if point in ("switched", "published", "ledger") else "v0000")
    assert forward_is_finite(dep.deploy / "current")
    if point == "shard-write":
        partial = [p for p in store.versions_dir.rglob("*.safetensors") if ".tmp-" in str(p)]
        assert partial, "the crash should leave a partial shard in the staging dir"
    if point == "renamed":  # between the directory rename and the symlink switch
        assert store.versions() == ["v0000", "v0001"] and live == "v0000"

    assert dep.run_once() == 0
    merged = ["alpha", "beta"] if with_second else ["alpha"]
    assert store.current() == f"v{len(merged):04d}"
    assert [e["drop"] for e in dep.ledger("merged")] == merged
    assert [t["name"] for t in store.version_info(store.current())["tasks"]] == merged
    assert_consistent(dep, merged=merged)


def test_crash_mid_take_and_mid_quarantine_are_finished_on_start(deployment):
    """A drop taken into incoming/ (crash before its merge) is merged on restart; a quarantine cut short between
    moving the drop and the final rename is finished, not deleted with the other leftovers."""
    import json
    import os

    from recall_daemon.intake import Intake

    dep = deployment
    store = dep.store
    good = dep.add("good", seed=3)
    Intake(store.incoming_dir).take(good, 1, "READY", None)  # as the daemon does, then "crashes"
    bad = dep.add("bad", samples=None)
    tmp = store.quarantine_dir / f"bad.tmp-{os.getpid() + 1}"
    tmp.mkdir()
    (tmp / "REASON.json").write_text(json.dumps({"drop": "bad", "hash": "-", "check": "samples", "error": "x"}))
    os.rename(bad, tmp / "drop")
    assert dep.run_once() == 0
    assert (store.quarantine_dir / "bad" / "drop" / "model.safetensors").is_file()
    assert_consistent(dep, merged=["good"], quarantined={"bad": "samples"})
