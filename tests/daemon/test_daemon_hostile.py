"""Hostile and unlucky drops (issue 11, RELIABILITY rules 13-15): no hang, no spin, no leak, no drop code, no
blocked queue. Each test: `--once` returns, the bad drop is quarantined with a reason naming the offending path,
the next good drop is merged, nothing from outside the drop is read or published, and the ledger names exactly
what went live. Points about hanging, spinning or signals run real daemon processes."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
from daemon_helpers import assert_consistent, wait_exit
from hostile_drops import (
    INGREDIENTS,
    Outside,
    assert_ledger_names_what_went_live,
    assert_nothing_leaked,
    assert_refused,
    expected_hashes,
    make_hostile,
    quarantine_reasons,
)

from recall_daemon import DaemonConfig
from recall_daemon.intake import Intake, content_hash, safe_name

pytest_plugins = ["daemon_fixtures"]


@pytest.fixture
def outside(tmp_path) -> Outside:
    return Outside.make(tmp_path / "outside")


def hostile_then_good(dep, outside, ingredients: list[str], name: str = "bad") -> dict[str, str]:
    make_hostile(dep, name, ingredients, outside)
    good = dep.add("good", seed=2)
    return expected_hashes({"good": good})


def check_invariants(dep, name: str, ingredients: list[str], good: dict[str, str]) -> dict:
    reason = assert_refused(dep, name, ingredients)
    assert_nothing_leaked(dep)
    assert_ledger_names_what_went_live(dep, good)
    assert_consistent(dep, merged=list(good), quarantined={name: reason["check"]})
    return reason


# 1. A dangling symlink (a `cp -r` of a Hugging Face cache snapshot) once made the daemon spin forever.
def test_1_dangling_symlink_is_refused_by_a_real_daemon_without_spinning(deployment, outside):
    dep = deployment
    good = hostile_then_good(dep, outside, ["dangling_symlink"])
    proc = dep.run_subprocess(timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) < 60, "the daemon logged like a spinning loop"
    check_invariants(dep, "bad", ["dangling_symlink"], good)


# 2. Symlinks were followed when publishing (merges.txt -> a secret) and by copytree across filesystems.
@pytest.mark.parametrize("filesystems", ["same", "cross"])
def test_2_symlinks_are_never_followed_on_one_or_across_filesystems(deployment, outside, monkeypatch, filesystems):
    dep = deployment
    make_hostile(dep, "bad", ["outside_symlink", "deploy_dir_symlink"], outside)
    good = expected_hashes({"good": dep.add("good", seed=2)})
    if filesystems == "cross":
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            if Path(src).parent == dep.drop:
                raise OSError(errno.EXDEV, "Invalid cross-device link (injected)")
            return real_rename(src, dst, *a, **k)

        monkeypatch.setattr(os, "rename", rename)
    assert dep.run_once() == 3
    monkeypatch.undo()
    reason = check_invariants(dep, "bad", ["outside_symlink", "deploy_dir_symlink"], good)
    assert bool(reason.get("left_in_place")) == (filesystems == "cross")  # a hostile tree is never copied
    assert (outside.root / "secret.txt").read_bytes().startswith(b"SECRET")
    if filesystems == "cross":  # recorded once, then skipped while unchanged: the queue moves on
        lines = len(dep.ledger())
        assert dep.run_once() == 0 and len(dep.ledger()) == lines


# 3. A FIFO or a link to /dev/zero hung the daemon, and SIGTERM was not honoured.
def test_3_fifo_and_dev_zero_never_hang_a_real_daemon_and_sigterm_stops_it_within_a_second(deployment, outside):
    dep = deployment
    make_hostile(dep, "fifo", ["fifo"], outside, seed=3)
    make_hostile(dep, "zero", ["dev_zero", "fifo_link"], outside, seed=4)
    good = expected_hashes({"good": dep.add("good", seed=2)})
    proc = dep.spawn("--poll", "0.5")
    try:
        dep.wait_for(lambda: dep.status().get("last_success") and len(quarantine_reasons(dep)) == 2, proc=proc,
                     what="both hostile drops quarantined and the good one merged", timeout=90)
        time.sleep(2.0)  # idle with nothing to do: the log must not grow (no spin)
        lines = len(dep.logs().splitlines())
        time.sleep(2.0)
        assert len(dep.logs().splitlines()) <= lines + 2, "the idle daemon keeps logging"
    finally:
        t0 = time.monotonic()
        rc = dep.stop(proc, timeout=10)
    assert rc == 0 and time.monotonic() - t0 < 1.5, f"SIGTERM took {time.monotonic() - t0:.2f}s\n{dep.logs()[-1500:]}"
    assert_refused(dep, "fifo", ["fifo"])
    assert_refused(dep, "zero", ["dev_zero", "fifo_link"])
    assert_nothing_leaked(dep)
    assert_ledger_names_what_went_live(dep, good)
    assert_consistent(dep, merged=["good"])


def test_3_sigterm_while_hashing_a_huge_drop_stops_within_a_second(deployment):
    """The longest stretch without a journal: hashing (here 8 GiB of sparse file). SIGTERM cuts it short; the
    drop stays taken in incoming/ and nothing is published."""
    dep = deployment
    d = dep.add("huge", seed=5)
    with open(d / "optimizer.bin", "wb") as f:
        f.truncate(8 << 30)
    proc = dep.spawn("--poll", "60")
    try:
        dep.wait_for(lambda: Intake(dep.store.incoming_dir).taken(), proc=proc, what="the drop to be taken",
                     timeout=90)
        time.sleep(0.5)
    finally:
        t0 = time.monotonic()
        rc = dep.stop(proc, timeout=10)
    assert rc == 0 and time.monotonic() - t0 < 1.5, f"SIGTERM took {time.monotonic() - t0:.2f}s\n{dep.logs()[-1500:]}"
    assert dep.store.current() == "v0000" and dep.store.journal.read().state == "idle"
    assert [t.name for t in Intake(dep.store.incoming_dir).taken()] == ["huge"]


# 4. A drop that cannot be renamed (drop folder not writable) or has a 255-byte name blocked the queue forever.
def test_4_a_drop_that_cannot_be_moved_is_copied_recorded_once_and_skipped(deployment, outside, monkeypatch):
    dep = deployment
    make_hostile(dep, "bad", ["python_file"], outside)
    good = expected_hashes({"good": dep.add("good", seed=2)})
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst, *a, **k):
        if Path(src).parent == dep.drop:
            raise PermissionError(errno.EACCES, "Permission denied (injected)", str(src))
        return real_rename(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if Path(path).parent == dep.drop:
            raise PermissionError(errno.EACCES, "Permission denied (injected)", str(path))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert dep.run_once() == 3
    lines = len(dep.ledger())
    assert dep.run_once() == 0 and len(dep.ledger()) == lines  # both left in place, recorded once, skipped
    monkeypatch.undo()
    reason = check_invariants(dep, "bad", ["python_file"], good)
    assert reason["left_in_place"] == str(dep.drop / "bad")
    assert [e["drop"] for e in dep.ledger("left")] == ["good"]
    assert (dep.drop / "good").is_dir() and (dep.drop / "bad").is_dir()


def test_4_names_of_any_legal_length_work(deployment, outside):
    dep = deployment
    long_bad, long_good = "b" * 255, "g" * 255
    make_hostile(dep, long_bad, ["dangling_symlink"], outside)
    good = expected_hashes({long_good: dep.add(long_good, seed=2)})
    assert dep.run_once() == 3
    assert dep.run_once() == 0  # and the daemon starts again
    assert len(safe_name(long_bad).encode()) < 200
    check_invariants(dep, long_bad, ["dangling_symlink"], good)


# 5. Drop code could run (auto_map + a terminal's "[y/N]") and was published.
@pytest.mark.parametrize("ingredient", ["python_file", "auto_map"])
def test_5_drops_with_custom_code_are_refused_and_no_load_trusts_remote_code(deployment, outside, monkeypatch,
                                                                            ingredient):
    import sys

    import transformers

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.LlamaForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(("recall_daemon", "recall_hf")):  # loading lives in recall_hf.models
                calls.append((caller, k.get("trust_remote_code", "unset")))
            return _real(klass, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    dep = deployment
    good = hostile_then_good(dep, outside, [ingredient])
    assert dep.run_once() == 3
    assert not Path("/tmp/drop-code-ran").exists()
    check_invariants(dep, "bad", [ingredient], good)
    assert calls and all(flag is False for _, flag in calls), calls


# 6. A drop rewritten in place mid-merge: the published weights came from content the ledger did not name.
def test_6_a_drop_rewritten_during_its_merge_is_merged_as_rewritten_and_the_ledger_says_so(deployment, monkeypatch):
    from daemon_helpers import make_drop

    from recall_daemon.publisher import Publisher

    dep = deployment
    d = dep.add("alpha", seed=1)
    other = make_drop(dep.root / "elsewhere", "other", dep.base, seed=9)  # what a writer puts in mid-merge
    expected = dep.root / "expected" / "alpha"
    shutil.copytree(d, expected)
    for f in ("model.safetensors", "recall.json"):
        shutil.copy(other / f, expected / f)
    real_build, done = Publisher.build, []

    def build(self, entry, taken, info):
        real_build(self, entry, taken, info)
        if not done:  # a writer with an open descriptor rewrites the taken drop after it was hashed
            done.append(1)
            for f in ("model.safetensors", "recall.json"):
                shutil.copy(other / f, taken.path / f)

    monkeypatch.setattr(Publisher, "build", build)
    original = content_hash(d)[0]
    assert dep.run_once() == 0
    merged = dep.ledger("merged")
    assert len(merged) == 1 and merged[0]["hash"] != original
    assert merged[0]["hash"] == content_hash(expected)[0]  # exactly the bytes that went live
    assert_consistent(dep, merged=["alpha"])


def test_6_a_producer_rewriting_the_same_name_makes_a_new_drop(deployment):
    dep = deployment
    first = expected_hashes({"alpha": dep.add("alpha", seed=1)})
    assert dep.run_once() == 0
    second = expected_hashes({"alpha": dep.add("alpha", seed=7)})
    assert dep.run_once() == 0
    merged = dep.ledger("merged")
    assert [e["hash"] for e in merged] == [first["alpha"], second["alpha"]]


# 7. task_count was trusted without bound.
def test_7_task_count_is_validated(deployment, outside):
    dep = deployment
    good = hostile_then_good(dep, outside, ["huge_task_count"])
    dep.add("beta", seed=3)
    assert dep.run_once() == 3
    good["beta"] = dep.ledger("merged")[-1]["hash"]
    reason = check_invariants(dep, "bad", ["huge_task_count"], good)
    assert "1000000" in reason["error"]
    # A version this deployment produced (task_count 2) may come back as a drop; a forged count may not.
    again = dep.drop / "again"
    shutil.copytree(dep.store.version_dir("v0002"), again)
    forged = dep.drop / "forged"
    shutil.copytree(dep.store.version_dir("v0002"), forged)
    recall = json.loads((forged / "recall.json").read_text())
    recall["task_count"] = 3
    (forged / "recall.json").write_text(json.dumps(recall))
    for d in (again, forged):
        (d / "recall_samples.jsonl").write_text('{"text": "a typical sample"}\n')
        (d / "READY").touch()
    assert dep.run_once() == 3
    assert quarantine_reasons(dep)["forged"]["check"] == "recall_json"
    assert dep.ledger("merged")[-1]["drop"] == "again"
    assert dep.store.version_info(dep.store.current())["task_count"] == 4


# 8. Producer staging names starting with the daemon's old prefixes were deleted or pulled into the queue.
def test_8_producer_names_are_never_touched(deployment):
    dep = deployment
    for name in (".ingested-upload", ".quarantine-upload", ".incoming", "x.partial"):
        dep.add(name, seed=4)
    good = expected_hashes({"good": dep.add("good", seed=2)})
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in dep.drop.iterdir() if p.name != "good"}
    assert dep.run_once() == 0
    after = {p.name: sorted(q.name for q in p.iterdir()) for p in dep.drop.iterdir()}
    assert after == before
    assert_ledger_names_what_went_live(dep, good)


# 9. Shard paths in an index could point outside the drop.
def test_9_index_shard_paths_must_stay_inside_the_drop(deployment, outside):
    dep = deployment
    good = hostile_then_good(dep, outside, ["index_escape"])
    assert dep.run_once() == 3
    check_invariants(dep, "bad", ["index_escape"], good)


# 10. The smaller points.
def test_10_metrics_listen_on_loopback_unless_told(tmp_path):
    from recall_daemon.cli import build_config, build_parser

    config = DaemonConfig(drop_dir=str(tmp_path / "d"), deploy_dir=str(tmp_path / "p"))
    assert config.metrics_addr == "127.0.0.1"
    args = build_parser().parse_args(["daemon", "--drop", "d", "--deploy", "p", "--metrics-addr", "0.0.0.0"])
    assert build_config(args).metrics_addr == "0.0.0.0"
    with pytest.raises(ValueError, match="tau must be a finite"):
        DaemonConfig(drop_dir="d", deploy_dir="p", recall={"tau": float("inf")})


def test_10_a_drop_that_is_a_symlink_is_quarantined_not_ignored(deployment, outside):
    dep = deployment
    target = dep.add("elsewhere", seed=5)
    os.rename(target, outside.root / "elsewhere")
    os.symlink(outside.root / "elsewhere", dep.drop / "linked")
    good = expected_hashes({"good": dep.add("good", seed=2)})
    assert dep.run_once() == 3
    reason = quarantine_reasons(dep)["linked"]
    assert reason["check"] == "layout" and "linked" in reason["error"] and "symlink" in reason["error"]
    assert (outside.root / "elsewhere" / "model.safetensors").is_file()  # the target is untouched
    assert_ledger_names_what_went_live(dep, good)
    assert_consistent(dep, merged=["good"])


def test_10_odd_names_samples_and_probes(deployment, outside, caplog):
    dep = deployment
    make_hostile(dep, "bad\nname", ["blank_samples"], outside, seed=3)
    make_hostile(dep, "binary", ["binary_samples"], outside, seed=4)
    good = expected_hashes({"good": dep.add("good", seed=2)})
    with caplog.at_level("INFO", logger="recall_daemon"):
        assert dep.run_once() == 3
    assert not [r for r in caplog.records if "\n" in r.getMessage()], "a drop name split a log line"
    for name, ingredient in (("bad\nname", "blank_samples"), ("binary", "binary_samples")):
        assert_refused(dep, name, [ingredient])
    assert "\n" not in "".join(p.name for p in dep.store.quarantine_dir.iterdir())
    assert_ledger_names_what_went_live(dep, good)
    probes = dep.root / "probes.txt"
    probes.write_bytes(b"\xff\xfe binary")
    with pytest.raises(ValueError, match="probes.txt"):
        dep.run_once(probes=str(probes))


def test_10_a_failed_start_leaves_nothing_behind(tmp_path, tiny_base):
    (tmp_path / "notamodel").mkdir()
    config = DaemonConfig(drop_dir=str(tmp_path / "d"), deploy_dir=str(tmp_path / "p"),
                          base=str(tmp_path / "notamodel"))
    from recall_daemon import DaemonService

    with pytest.raises(ValueError, match="not a usable model"):
        DaemonService(config).run(once=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notamodel"]


# The burst: random combinations of every ingredient above, a real daemon process, the same invariants.
def test_fuzz_burst_of_hostile_and_good_drops(deployment, outside):
    dep = deployment
    rng = random.Random(11)
    content = sorted(INGREDIENTS)
    bad: dict[str, list[str]] = {}
    good_paths: dict[str, Path] = {}
    untouched: list[str] = []
    for i in range(36):
        ingredients = rng.sample(content, rng.choice([0, 1, 1, 2, 2]))
        style = rng.choice(["plain", "plain", "plain", "long", "newline", "producer"])
        name = {"plain": f"d{i:02d}", "long": f"d{i:02d}" + "L" * 240, "newline": f"d{i:02d}\nx",
                "producer": f".ingested-d{i:02d}"}[style]
        d = make_hostile(dep, name, ingredients, outside, seed=20 + i)
        if style == "producer":
            untouched.append(name)
        elif ingredients:
            bad[name] = ingredients
        else:
            good_paths[name] = d
    good = expected_hashes(good_paths)
    assert len(bad) >= 12 and len(good) >= 4, (len(bad), len(good))
    t0 = time.monotonic()
    pid = dep.fork_daemon(once=True, keep=2)
    rc = wait_exit(pid, timeout=240)
    print(f"fuzz burst: {len(bad)} hostile, {len(good)} good, {len(untouched)} producer-named drops in "
          f"{time.monotonic() - t0:.1f}s")
    assert rc == 3
    for name, ingredients in bad.items():
        assert_refused(dep, name, ingredients)
    assert_nothing_leaked(dep)
    merged_order = [e["drop"] for e in dep.ledger("merged")]
    assert sorted(merged_order) == sorted(good)
    assert_ledger_names_what_went_live(dep, {n: good[n] for n in merged_order})
    assert sorted(p.name for p in dep.drop.iterdir()) == sorted(untouched)
    assert_consistent(dep, merged=list(good), quarantined={n: quarantine_reasons(dep)[n]["check"] for n in bad})
