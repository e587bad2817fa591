"""The publish path end to end, in process with `--once`: versions, model card, ledger, duplicates, space, rollback."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from daemon_helpers import SAMPLES, assert_consistent, make_drop
from safetensors.torch import load_file

from recall_daemon import cli
from recall_daemon.faults import FAULT_ENV
from recall_daemon.intake import content_hash
from recall_hf.durable import current_umask
from recall_hf.modeldir import READY, weight_hashes

pytest_plugins = ["daemon_fixtures"]


def test_two_drops_become_two_versions_with_a_cumulative_card(deployment):
    dep = deployment
    dep.add("alpha", seed=1)
    beta = dep.add("beta", seed=2)
    beta_hashes = {rel: h for rel, h in content_hash(beta)[1].items() if rel.endswith(".safetensors")}
    assert dep.run_once() == 0
    store = dep.store
    assert store.current() == "v0002" and store.versions() == ["v0000", "v0001", "v0002"]
    # The report records the real sha256 of both inputs (the daemon passes on what it verified, it does not rehash).
    # beta was taken into DEPLOY/incoming/ and merged from there (the report names that path).
    inputs = json.loads((store.version_dir("v0002") / "recall_report.json").read_text())["input_hashes"]
    taken = [k for k in inputs if k != str(store.version_dir("v0001"))]
    assert inputs[str(store.version_dir("v0001"))] == weight_hashes(store.version_dir("v0001"))
    assert len(taken) == 1 and inputs[taken[0]] == beta_hashes
    assert os.path.dirname(taken[0]) == str(store.incoming_dir)
    assert store.parent_of("v0002") == "v0001" and store.parent_of("v0001") == "v0000"
    v2 = store.version_dir("v0002")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recall_report.json", "recall_weights.png",
                 "README.md", "version.json", "recall.json"):
        assert (v2 / name).is_file(), name
    assert json.loads((v2 / "recall.json").read_text())["task_count"] == 2
    # Every version is readable by a server running as another user (modes follow the umask; the base's weights
    # were written 0600 by transformers).
    mask = current_umask()
    for version in ("v0000", "v0002"):
        for p in [store.version_dir(version), *store.version_dir(version).iterdir()]:
            assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p
    info = store.version_info("v0002")
    assert [t["name"] for t in info["tasks"]] == ["alpha", "beta"]
    assert all(len(t["weights"]["per_layer"]) == 3 for t in info["tasks"])  # embeddings + 2 blocks
    card = (v2 / "README.md").read_text()
    for t in info["tasks"]:
        assert t["task"] in card and t["hash"][:16] in card
    # The merge moved the weights: v0002 is neither the base nor the last drop.
    merged, base = load_file(str(v2 / "model.safetensors")), load_file(str(dep.base / "model.safetensors"))
    assert not torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert list(dep.drop.iterdir()) == []
    status = json.loads(store.status_path.read_text())
    assert status["current"] == "v0002" and status["last_success"]["drop"] == "beta"
    metrics = store.metrics_path.read_text()
    assert "recall_daemon_drops_ingested_total 2.0" in metrics
    assert "recall_daemon_current_version 2.0" in metrics
    assert "recall_daemon_last_success_timestamp_seconds" in metrics
    assert_consistent(dep, merged=["alpha", "beta"])


def test_same_drop_twice_and_same_content_under_a_new_name(deployment):
    dep = deployment
    first = dep.add("alpha", seed=1)
    keep = dep.root / "alpha-copy"
    shutil.copytree(first, keep)
    assert dep.run_once() == 0
    shutil.copytree(keep, dep.drop / "alpha")  # the same drop again
    shutil.copytree(keep, dep.drop / "renamed")  # the same content under another name
    (dep.drop / "renamed" / READY).unlink()
    (dep.drop / "renamed" / READY).touch()  # READY is not part of the content
    assert dep.run_once() == 0
    assert dep.store.versions() == ["v0000", "v0001"]
    assert [e["drop"] for e in dep.ledger("merged")] == ["alpha"]
    assert sorted(e["drop"] for e in dep.ledger("duplicate")) == ["alpha", "renamed"]
    assert list(dep.drop.iterdir()) == []
    assert_consistent(dep, merged=["alpha"])


def test_content_hash_ignores_name_and_ready(tmp_path, tiny_base):
    from daemon_helpers import make_drop

    a = make_drop(tmp_path, "a", tiny_base, seed=3, recall_json=False)
    b = make_drop(tmp_path, "b", tiny_base, seed=3, recall_json=False, ready=False)
    c = make_drop(tmp_path, "c", tiny_base, seed=4, recall_json=False)
    assert content_hash(a)[0] == content_hash(b)[0] != content_hash(c)[0]


def test_after_ingest_move_keeps_the_drop_in_deploy_ingested(deployment):
    dep = deployment
    digest = content_hash(dep.add("alpha"))[0]
    assert dep.run_once(after_ingest="move") == 0
    assert (dep.deploy / "ingested" / f"alpha-{digest[:12]}" / "model.safetensors").is_file()
    assert_consistent(dep, merged=["alpha"])


def test_keep_prunes_old_versions_but_never_live_predecessor_or_base(deployment):
    dep = deployment
    for i in range(4):
        dep.add(f"t{i}", seed=10 + i)
    assert dep.run_once(keep=1) == 0
    assert dep.store.versions() == ["v0000", "v0003", "v0004"]
    assert_consistent(dep, merged=["t0", "t1", "t2", "t3"])


def test_slow_writer_without_marker_is_taken_only_after_the_quiet_period(deployment):
    dep = deployment
    d = dep.add("slow", ready=False, recall_json=False)
    sample_file = d / "recall_samples.jsonl"
    assert dep.run_once(quiet_period=1.5) == 0
    assert dep.store.current() == "v0000" and (d / "model.safetensors").exists()
    status = json.loads(dep.store.status_path.read_text())
    assert status["writing"] == ["slow"]
    # The writer is still going: every write restarts the quiet period.
    for _ in range(3):
        time.sleep(0.6)
        with open(sample_file, "a") as f:
            f.write(json.dumps({"text": "one more typical sample"}) + "\n")
        assert dep.run_once(quiet_period=1.5) == 0
        assert dep.store.current() == "v0000"
    time.sleep(1.6)
    assert dep.run_once(quiet_period=1.5) == 0
    assert dep.store.current() == "v0001"
    assert_consistent(dep, merged=["slow"])


def test_work_in_progress_names_are_never_taken(deployment):
    dep = deployment
    dep.add(".hidden.tmp-123")
    dep.add("upload.partial")
    dep.add("copy.tmp", ready=False)
    assert dep.run_once(quiet_period=0.0) == 0
    assert dep.store.current() == "v0000"
    assert sorted(p.name for p in dep.drop.iterdir()) == [".hidden.tmp-123", "copy.tmp", "upload.partial"]
    shutil.rmtree(dep.drop)
    assert_consistent(dep)


def test_injected_enospc_while_staging_keeps_current_and_retries(deployment, monkeypatch):
    dep = deployment
    dep.add("alpha")
    monkeypatch.setenv(FAULT_ENV, "enospc")
    assert dep.run_once() == 1  # deferred, not quarantined
    store = dep.store
    assert store.current() == "v0000" and store.versions() == ["v0000"]
    assert [p.name for p in store.incoming_dir.iterdir() if not p.name.endswith(".json")]  # taken, waiting
    assert list(store.quarantine_dir.iterdir()) == []
    error = json.loads(store.status_path.read_text())["last_error"]
    assert error["kind"] == "no_space" and error["drop"] == "alpha" and "injected" in error["error"]
    assert str(store.versions_dir) in error["error"]  # the error names where space ran out
    assert 'recall_daemon_drops_deferred_total{reason="no_space"} 1.0' in store.metrics_path.read_text()
    assert not [p for p in dep.deploy.rglob("*") if ".tmp-" in p.name]
    assert (status := json.loads(store.status_path.read_text()))["queue"] == ["alpha"], status
    monkeypatch.delenv(FAULT_ENV)
    assert dep.run_once() == 0
    assert store.current() == "v0001"
    assert_consistent(dep, merged=["alpha"])


def test_free_space_check_defers_before_staging(deployment, monkeypatch):
    import recall_daemon.worker as worker

    dep = deployment
    dep.add("alpha")
    monkeypatch.setattr(worker, "free_bytes", lambda path: 1024)
    assert dep.run_once() == 1
    assert dep.store.current() == "v0000" and dep.store.journal.read().state == "idle"
    assert "MiB free" in json.loads(dep.store.status_path.read_text())["last_error"]["error"]
    monkeypatch.undo()
    assert dep.run_once() == 0
    assert_consistent(dep, merged=["alpha"])


def test_rollback_to_previous_then_merge_on_top(deployment, capsys):
    dep = deployment
    dep.add("alpha", seed=1)
    dep.add("beta", seed=2)
    assert dep.run_once() == 0
    assert cli.main(["rollback", "--deploy", str(dep.deploy)]) == 0
    assert "v0002 -> v0001" in capsys.readouterr().out
    assert dep.store.current() == "v0001"
    assert dep.ledger("rollback")[-1]["version"] == "v0001"
    dep.add("gamma", seed=3)
    assert dep.run_once() == 0
    assert dep.store.current() == "v0003" and dep.store.parent_of("v0003") == "v0001"
    assert [t["name"] for t in dep.store.version_info("v0003")["tasks"]] == ["alpha", "gamma"]
    assert cli.main(["rollback", "--deploy", str(dep.deploy), "--to", "v0000"]) == 0
    assert dep.store.current() == "v0000"
    assert cli.main(["rollback", "--deploy", str(dep.deploy), "--to", "v0042"]) == 2
    assert "No version 'v0042'" in capsys.readouterr().err
    assert_consistent(dep)


def test_missing_or_dangling_current_degrades_to_the_last_good_version(deployment):
    dep = deployment
    dep.add("alpha")
    assert dep.run_once() == 0
    link = dep.deploy / "current"
    link.unlink()
    os.symlink("versions/v0007", link)  # dangling
    dep.add("beta", seed=2)
    assert dep.run_once() == 0
    assert dep.store.current() == "v0002" and dep.store.parent_of("v0002") == "v0001"
    link.unlink()  # missing
    assert dep.run_once() == 0
    assert dep.store.current() == "v0002"
    assert_consistent(dep, merged=["alpha", "beta"])


def test_torn_ledger_line_is_repaired(deployment):
    dep = deployment
    with open(dep.store.ledger.path, "a") as f:
        f.write('{"hash": "abc", "result": "mer')  # a crash mid-append
    dep.add("alpha")
    assert dep.run_once() == 0
    assert_consistent(dep, merged=["alpha"])


def test_status_command_reports_versions_tasks_and_quarantine(deployment, capsys):
    dep = deployment
    dep.add("alpha")
    dep.add("broken", samples=None)
    assert dep.run_once() == 3
    assert cli.main(["status", "--deploy", str(dep.deploy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["running"] is False and report["current"] == "v0001" and report["journal"] == "idle"
    assert [t["task"] for t in report["tasks"]] == ["task alpha"]
    assert report["ledger"] == {"init": 1, "merged": 1, "quarantined": 1}
    assert report["quarantine"][0]["name"] == "broken" and report["quarantine"][0]["check"] == "samples"
    assert cli.main(["status", "--deploy", str(dep.deploy)]) == 0
    out = capsys.readouterr().out
    assert "not running" in out and "quarantined: broken: samples" in out
    assert_consistent(dep, merged=["alpha"], quarantined={"broken": "samples"})


def test_daemon_wide_probes_stand_in_for_missing_samples(deployment):
    dep = deployment
    probes = dep.root / "probes.jsonl"
    probes.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLES))
    dep.add("alpha", samples=None)
    assert dep.run_once(probes=str(probes)) == 0
    assert_consistent(dep, merged=["alpha"])


def test_empty_deploy_without_base_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["daemon", "--drop", str(tmp_path / "d"), "--deploy", str(tmp_path / "p"), "--once"])
    assert rc == 2
    assert "pass --base MODEL_DIR" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # a failed start leaves no skeleton, lock or status behind


@pytest.mark.parametrize("argv", [["--help"], ["daemon", "--help"], ["status", "--help"], ["rollback", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_task_vector_fusion_measures_task_vectors_from_the_base(deployment):
    from recall_hf.config import RecallConfig

    dep = deployment
    dep.add("alpha", seed=1)
    dep.add("beta", seed=2)
    assert dep.run_once(recall=RecallConfig(fusion="task_vector")) == 0
    store = dep.store
    report = json.loads((store.version_dir("v0002") / "recall_report.json").read_text())
    assert report["stats"]["base"] == str(store.version_dir("v0000"))
    coef = torch.tensor(report["stats"]["task_vector_coefficients"])
    base = load_file(store.version_dir("v0000") / "model.safetensors")
    v1 = load_file(store.version_dir("v0001") / "model.safetensors")
    v2 = load_file(store.version_dir("v0002") / "model.safetensors")
    drop_b = load_file(make_drop(dep.root / "ref", "beta", dep.base, seed=2) / "model.safetensors")  # same seed
    name = "model.embed_tokens.weight"  # layer 0
    expected = base[name] + coef[0, 0] * (v1[name] - base[name]) + coef[0, 1] * (drop_b[name] - base[name])
    assert torch.allclose(v2[name], expected, atol=1e-5)
    assert_consistent(dep, merged=["alpha", "beta"])
