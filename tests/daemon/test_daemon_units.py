"""Small pieces without a merge: configuration, the journal, the drop scan, the ledger, the command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from recall_daemon import DaemonConfig
from recall_daemon.cli import build_config, build_parser
from recall_daemon.drops import scan
from recall_daemon.journal import INTENT, MERGED, Journal, JournalEntry
from recall_daemon.ledger import Result
from recall_daemon.store import DeployStore
from recall_daemon.validation import DropRejected

pytest_plugins = ["daemon_fixtures"]

REPO = Path(__file__).resolve().parents[2]


def test_example_config_loads_and_flags_override_it():
    args = build_parser().parse_args(["daemon", "--config", str(REPO / "daemon" / "example-config.toml"),
                                      "--poll", "5", "--tau", "0.3", "--no-events"])
    config = build_config(args)
    assert config.poll == 5.0 and config.events is False and config.keep == 3
    assert config.recall.tau == 0.3 and config.recall.similarity == "rbf"


@pytest.mark.parametrize("bad, message", [
    ({"keep": 0}, "keep must be >= 1"),
    ({"after_ingest": "archive"}, "after_ingest must be one of delete, move"),
    ({"poll": 0}, "poll must be > 0"),
    ({"recall": {"mode": "multi"}}, "must be 'continual'"),
    ({"recall": {"tua": 1.0}}, "Unknown RecallConfig fields ['tua']"),
    ({"colour": "blue"}, "Unknown daemon settings ['colour']"),
])
def test_bad_settings_say_what_is_wrong(tmp_path, bad, message):
    with pytest.raises(ValueError) as err:
        DaemonConfig.from_dict({"drop_dir": str(tmp_path / "d"), "deploy_dir": str(tmp_path / "p"), **bad})
    assert message in str(err.value)


def test_same_folder_for_drop_and_deploy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="same folder"):
        DaemonConfig(drop_dir=str(tmp_path), deploy_dir=str(tmp_path))


def test_missing_drop_flag(tmp_path):
    args = build_parser().parse_args(["daemon", "--deploy", str(tmp_path)])
    with pytest.raises(ValueError, match="missing --drop"):
        build_config(args)


def test_journal_round_trip_and_unreadable_journal_reads_idle(tmp_path):
    journal = Journal(tmp_path / "journal.json")
    assert journal.read().state == "idle"
    entry = journal.write(JournalEntry(INTENT, drop="a", hash="h" * 64, version="v0001", parent="v0000"))
    journal.write(entry.advance(MERGED, merge_seconds=1.5))
    back = journal.read()
    assert (back.state, back.drop, back.version, back.merge_seconds) == (MERGED, "a", "v0001", 1.5)
    with pytest.raises(ValueError, match="Unknown journal state"):
        entry.advance("halfway")
    (tmp_path / "journal.json").write_text("{garbage")
    assert journal.read().state == "idle"


def test_scan_orders_by_arrival_then_name_and_holds_back_unquiet_drops(tmp_path):
    for name in ("b", "a", "c", "slow"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    for name in ("b", "a", "c"):
        (tmp_path / name / "READY").touch()
    old = time.time() - 100
    for name in ("a", "c"):
        for p in (tmp_path / name, *(tmp_path / name).iterdir()):
            os.utime(p, (old, old))
    complete, writing = scan(tmp_path, quiet_period=30)
    # Backdating mtimes changes ctime, which cannot be backdated: a and c changed last, so they come after b.
    assert [s.name for s in complete] == ["b", "a", "c"]
    assert complete[1].arrived_ns <= complete[2].arrived_ns
    assert [s.name for s in writing] == ["slow"] and writing[0].ready_at > time.time()
    complete, writing = scan(tmp_path, quiet_period=0)
    assert "slow" in [s.name for s in complete] and not writing


def test_ledger_ignores_a_torn_last_line(tmp_path):
    ledger = DeployStore(tmp_path).ledger
    ledger.append(Result.MERGED, hash="a")
    with open(ledger.path, "a") as f:
        f.write('{"hash": "b", "res')
    assert [e["hash"] for e in ledger.entries()] == ["a"]
    ledger.repair()
    ledger.append(Result.MERGED, hash="c")
    assert [json.loads(line)["hash"] for line in ledger.path.read_text().splitlines()] == ["a", "c"]
    assert set(ledger.merged()) == {"a", "c"}


def test_unknown_check_name_is_a_programming_error():
    with pytest.raises(ValueError, match="Unknown check"):
        DropRejected("vibes", "bad")


def test_recall_hf_cli_has_the_daemon_commands(capsys):
    from recall_hf.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "daemon" in out and "status" in out and "rollback" in out


def test_unknown_crash_point_is_refused(tmp_path, tiny_base, monkeypatch):
    from daemon_helpers import Deployment

    from recall_daemon.faults import CRASH_ENV

    monkeypatch.setenv(CRASH_ENV, "somewhere")
    with pytest.raises(ValueError, match="not a crash point"):
        Deployment(tmp_path, tiny_base).run_once()


def test_backoff_doubles_to_its_cap_and_resets():
    from recall_daemon.service import Backoff

    b = Backoff(first=0.5, cap=3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next() == 0.5


def test_names_of_any_length_and_character_become_safe_folder_names():
    from recall_daemon.intake import printable, safe_name

    assert safe_name("task-a") == "task-a"
    odd = ["x" * 255, "a\nb", "..", ".hidden", "é" * 120, "a/b"]
    names = [safe_name(n) for n in odd]
    assert len(set(names)) == len(odd)
    for n in names:
        assert len(n.encode()) <= 200 and n.isprintable() and "/" not in n and not n.startswith(".")
    assert printable("a\nb\tc") == "a\\nb\\tc" and printable("données") == "données"


def test_layout_check_refuses_without_following(tmp_path):
    from recall_daemon.intake import check_contents, scan_layout

    d = tmp_path / "drop"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.json").write_text("{}")
    assert scan_layout(d) == {"sub/a.json": 2}
    os.symlink("/dev/zero", d / "sub" / "z")
    with pytest.raises(DropRejected, match=r"sub/z is a symlink \(-> /dev/zero\)"):
        scan_layout(d)
    (d / "sub" / "z").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "/etc/passwd"}}))
    with pytest.raises(DropRejected, match="leaves the drop"):
        check_contents(d, scan_layout(d))


def test_deploy_store_versions_are_a_library_versioned_dir(tmp_path, monkeypatch):
    """The deploy folder's versions, `current` and pruning are `recall_hf.versions.VersionedDir`: one implementation.
    A crash mid-prune leaves a `*.tmp-*` leftover that `remove_stale` clears; the live version is never pruned."""
    import shutil

    from recall_hf.versions import VersionedDir

    store = DeployStore(tmp_path / "deploy")
    assert isinstance(store.vdir, VersionedDir) and store.next_version() == "v0000"
    for _ in range(5):
        store.version_dir(store.next_version()).mkdir(parents=True)
    store.switch_current("v0002")
    assert os.readlink(store.current_link) == os.path.join("versions", "v0002")
    assert store.prune(keep=1) == ["v0001", "v0003"] and store.versions() == ["v0000", "v0002", "v0004"]

    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(OSError("crash mid-delete")))
    store.switch_current("v0004")
    with pytest.raises(OSError, match="crash mid-delete"):
        store.prune(keep=1)
    assert store.versions() == ["v0000", "v0004"] and [p.name[:5] for p in store.stale_paths()] == ["v0002"]
    monkeypatch.undo()
    store.remove_stale()
    assert store.stale_paths() == [] and store.current() == "v0004"
