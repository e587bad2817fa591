"""Promotion gates (recall_daemon/gate.py): the fingerprint gate refuses a calibrated merge that regresses an earlier
task, `--gate CMD` runs the operator's evaluation on the staged version, a `kill -9` during the gate publishes
nothing; and the per-task divergence every calibrated version records shows in status, metrics and the card."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time

import pytest
import torch
from daemon_helpers import SAMPLES, assert_consistent, make_drop, wait_exit
from huggingface_hub import ModelCard

from recall_daemon.cli import build_config, build_parser, collect_status, main
from recall_daemon.gate import GATE_LOGS, LOG_BYTES, _Tail, check_regression, env_value
from recall_daemon.journal import INTENT
from recall_daemon.modelcard import RETENTION_PLOT
from recall_daemon.store import REASON_NAME
from recall_hf.config import RecallConfig
from recall_hf.task_checkpoint import make_task_checkpoint

pytest_plugins = ["daemon_fixtures"]
CALIBRATE = {"calibrate": True, "k": 3}


def task_drop(dep, name: str, seed: int, scale: float, head: float = 0.0, source=None):
    """A task checkpoint with its fingerprint: the base (or `source`, e.g. the live version) plus seeded noise of
    `scale`, and `head` times unit noise on the output head only. `head=1` makes a confident task model: two such
    tasks conflict, so every fold that learns the second moves the first far from its own model."""
    def wreck_head(tensors):
        gen = torch.Generator().manual_seed(seed + 100)
        for name in [k for k in tensors if k.endswith("lm_head.weight")]:
            tensors[name] = tensors[name] + head * torch.randn(tensors[name].shape, generator=gen)

    d = make_drop(dep.drop, name, dep.base, seed=seed, scale=scale, ready=False, recall_json=False, samples=None,
                  mutate=wreck_head, source=source)
    return make_task_checkpoint(d, SAMPLES, task=name, config=RecallConfig(k=3))


def reason(dep, name: str) -> dict:
    return json.loads((dep.store.quarantine_dir / name / REASON_NAME).read_text())


def test_fingerprint_gate_quarantines_a_constructed_regression_and_retention_is_visible(deployment, capsys):
    dep, store = deployment, deployment.store
    task_drop(dep, "alpha", 1, 0.02, head=1.0)
    assert dep.run_once(recall=CALIBRATE) == 0
    task_drop(dep, "beta", 2, 0.02, head=1.0)  # every fold that learns beta moves alpha far from its own model
    assert dep.run_once(recall=CALIBRATE) == 3
    assert store.current() == "v0001" and store.versions() == ["v0000", "v0001"]
    why = reason(dep, "beta")
    assert why["check"] == "regression" and "'alpha'" in why["error"]
    alpha = why["details"]["tasks"]["alpha"]
    assert why["details"]["margin"] == 0.1 and why["details"]["regressed"] == ["alpha"]
    assert alpha["live"] == pytest.approx(0.0, abs=1e-6) and alpha["staged"] > 0.1 + alpha["live"]
    assert dep.ledger("quarantined")[-1]["check"] == "regression"
    metrics = store.metrics_path.read_text()
    assert 'recall_daemon_gate_checks_total{gate="fingerprint",result="failed"} 1.0' in metrics
    assert 'recall_daemon_drops_quarantined_total{reason="regression"} 1.0' in metrics

    task_drop(dep, "gamma", 3, 0.005, source=store.version_dir("v0001"))  # fine-tuned a little from the live model
    assert dep.run_once(recall=CALIBRATE) == 0
    assert store.current() == "v0002"
    info = store.version_info("v0002")
    assert sorted(info["divergence"]) == ["alpha", "gamma"]
    assert 0 < info["divergence"]["alpha"] < 0.1
    assert [r["version"] for r in info["retention"]] == ["v0001", "v0002"]
    assert info["gates"]["fingerprint"]["result"] == "passed"
    assert dep.ledger("merged")[-1]["gates"]["fingerprint"]["tasks"]["alpha"]["staged"] == info["divergence"]["alpha"]

    metrics = store.metrics_path.read_text()
    assert f'recall_daemon_task_divergence{{task="alpha"}} {info["divergence"]["alpha"]}' in metrics
    assert 'recall_daemon_task_divergence{task="gamma"}' in metrics
    assert 'recall_daemon_gate_checks_total{gate="fingerprint",result="passed"} 1.0' in metrics

    status = collect_status(store)
    assert status["divergence"] == info["divergence"] and status["gate_quarantines"] == {"regression": 1}
    assert status["gates"]["fingerprint"] == "on (margin 0.1)"
    assert main(["status", "--deploy", str(dep.deploy)]) == 0
    out = capsys.readouterr().out
    assert "fingerprint divergence of the live version" in out and "  alpha: " in out and "regression 1" in out

    folder = store.version_dir("v0002")
    card = ModelCard.load(folder / "README.md")
    assert "## Retention" in card.text and f"]({RETENTION_PLOT})" in card.text
    assert "| task | v0001 | v0002 |" in card.text and "| alpha | 0 |" in card.text
    assert (folder / RETENTION_PLOT).read_bytes().startswith(b"\x89PNG")
    published = [p for p in folder.rglob("*") if p.is_file() and not p.relative_to(folder).as_posix().startswith("_")]
    assert folder / RETENTION_PLOT in published and folder / "version.json" in published
    for path in published:  # the plot, the retention record and the gates' scores hold no typical-sample text
        assert not any(s.encode() in path.read_bytes() for s in SAMPLES), path
    assert_consistent(dep, merged=["alpha", "gamma"], quarantined={"beta": "regression"})


def test_fingerprint_gate_off_publishes_and_a_negative_margin_refuses_everything(deployment):
    dep, store = deployment, deployment.store
    task_drop(dep, "alpha", 1, 0.02, head=1.0)
    task_drop(dep, "beta", 2, 0.02, head=1.0)
    assert dep.run_once(recall=CALIBRATE, fingerprint_gate=False) == 0
    assert store.current() == "v0002"
    assert store.version_info("v0002")["gates"]["fingerprint"] == {"result": "off"}
    assert store.version_info("v0002")["divergence"]["alpha"] > 0.1  # the regression the gate would have refused
    task_drop(dep, "gamma", 3, 0.1)
    assert dep.run_once(recall=CALIBRATE, regression_margin=-1.0) == 3
    assert reason(dep, "gamma")["check"] == "regression" and store.current() == "v0002"
    assert_consistent(dep, merged=["alpha", "beta"], quarantined={"gamma": "regression"})


def gate_command(tmp_path, code: int) -> str:
    """A gate that records what it was given (names only through the environment) and exits `code`."""
    return (f'cd "{tmp_path}" && printf "%s|%s|%s|%s\\n" "$RECALL_DROP" "$RECALL_VERSION" "$RECALL_VERSION_DIR" '
            f'"$RECALL_STAGED" >> seen.txt && test -f "$RECALL_VERSION_DIR/config.json" && echo evaluated && '
            f"exit {code}")


def test_gate_command_exit_1_quarantines_exit_0_publishes(deployment, tmp_path):
    dep, store = deployment, deployment.store
    evil = "evil $(touch pwned) `touch pwned2`;"
    dep.add(evil, seed=1)
    assert dep.run_once(gate=gate_command(tmp_path, 1)) == 3
    assert store.current() == "v0000" and store.versions() == ["v0000"]
    refused = store.quarantined()[0]
    assert refused["check"] == "gate" and refused["details"]["exit_code"] == 1
    assert "evaluated" in refused["details"]["output_tail"] and "exited 1" in refused["error"]
    assert not list(tmp_path.glob("pwned*")) and not list(dep.root.glob("pwned*"))
    drop, version, staged, flag = (tmp_path / "seen.txt").read_text().splitlines()[0].split("|")
    assert (drop, version, flag) == (evil, "v0001", "1") and ".tmp-" in staged and not os.path.exists(staged)
    assert (store.root / GATE_LOGS / f"v0001-{refused['hash'][:12]}.log").is_file()
    assert 'recall_daemon_gate_checks_total{gate="command",result="failed"} 1.0' in store.metrics_path.read_text()
    assert store.read_status()["gates"]["fingerprint"].startswith("not applicable: calibrate is off")

    dep.add("beta", seed=2)
    assert dep.run_once(gate=gate_command(tmp_path, 0)) == 0
    assert store.current() == "v0001"
    assert dep.ledger("merged")[-1]["gates"]["command"]["result"] == "passed"
    assert collect_status(store)["gates"]["last"]["result"] == "passed"
    assert_consistent(dep, merged=["beta"])


def test_gate_command_past_its_timeout_is_killed_and_quarantines(deployment):
    dep = deployment
    dep.add("alpha", seed=1)
    started = time.monotonic()
    assert dep.run_once(gate="echo started; exec sleep 60", gate_timeout=0.5) == 3
    assert time.monotonic() - started < 50  # killed, not waited for
    details = dep.store.quarantined()[0]["details"]
    assert details["timed_out"] and details["exit_code"] is None and "started" in details["output_tail"]
    assert_consistent(dep, quarantined={"alpha": "gate"})


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_during_the_gate_recovers_without_publishing(deployment, tmp_path):
    dep, store = deployment, deployment.store
    dep.add("alpha", seed=1)
    marker = tmp_path / "gate-running"
    pid = dep.fork_daemon(once=True, gate=f'echo $$ > "{marker}.tmp" && mv "{marker}.tmp" "{marker}" && exec sleep 60')
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the gate never started"
    os.kill(pid, signal.SIGKILL)
    assert wait_exit(pid) == -signal.SIGKILL
    assert store.journal.read().state == INTENT and store.current() == "v0000"
    assert store.versions() == ["v0000"]  # nothing ungated became a version
    gate_pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while _alive(gate_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(gate_pid), "the gate outlived the daemon (parent-death signal)"

    assert dep.run_once(gate="exit 1") == 3  # recovery merges again and gates again: refused, never published
    assert store.current() == "v0000" and reason(dep, "alpha")["check"] == "gate"
    dep.add("beta", seed=2)
    assert dep.run_once(gate="true") == 0 and store.current() == "v0001"
    assert_consistent(dep, merged=["beta"], quarantined={"alpha": "gate"})


def test_sigterm_during_the_gate_kills_it_and_leaves_the_drop_for_the_next_start(deployment, tmp_path):
    dep, store = deployment, deployment.store
    dep.add("alpha", seed=1)
    marker = tmp_path / "gate-running"
    pid = dep.fork_daemon(gate=f'echo $$ > "{marker}.tmp" && mv "{marker}.tmp" "{marker}" && exec sleep 60')
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the gate never started"
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(pid, timeout=30) == 0
    assert not _alive(int(marker.read_text())), "SIGTERM must kill the gate's process group"
    assert store.current() == "v0000" and [p.name for p in store.incoming_dir.iterdir()]
    assert dep.run_once(gate="true") == 0 and store.current() == "v0001"
    assert_consistent(dep, merged=["alpha"])


def test_gate_flags_and_settings(tmp_path):
    args = build_parser().parse_args(["daemon", "--drop", str(tmp_path / "d"), "--deploy", str(tmp_path / "p"),
                                      "--gate", "./eval.sh", "--gate-timeout", "30", "--regression-margin", "0.25",
                                      "--no-fingerprint-gate", "--calibrate", "--calibrate-rule", "mean"])
    config = build_config(args)
    assert (config.gate, config.gate_timeout, config.regression_margin, config.fingerprint_gate) == (
        "./eval.sh", 30.0, 0.25, False)
    assert (config.recall.calibrate, config.recall.calibrate_rule) == (True, "mean")
    defaults = build_config(build_parser().parse_args(["daemon", "--drop", "a", "--deploy", "b"]))
    assert (defaults.gate, defaults.regression_margin, defaults.fingerprint_gate) == (None, 0.1, True)
    assert defaults.recall.calibrate_rule == "minimax"
    with pytest.raises(SystemExit):  # argparse: one line naming the choices
        build_parser().parse_args(["daemon", "--drop", "a", "--deploy", "b", "--calibrate-rule", "median"])
    for bad, what in (({"gate_timeout": 0}, "gate_timeout"), ({"regression_margin": float("nan")}, "margin"),
                      ({"gate": " "}, "gate must")):
        with pytest.raises(ValueError, match=what):
            type(config)(drop_dir="a", deploy_dir="b", **bad)


def test_regression_compares_earlier_tasks_only_and_output_is_bounded():
    cand = lambda name, a, n: {"name": name, "scores": {"old": {"divergence": a}, "new": {"divergence": n}}}  # noqa: E731
    cal = {"new_task": "new", "candidates": [cand("keep", 0.2, 5.0), cand("x", 0.29, 0.0)],
           "chosen": cand("x", 0.29, 0.0)}
    assert check_regression(cal, 0.1).passed  # old rose 0.09; the new task's own rise never counts
    verdict = check_regression(cal, 0.05)
    assert verdict.worse == {"old": pytest.approx(0.09)} and verdict.details()["tasks"]["old"]["live"] == 0.2
    assert "'new'" not in verdict.message()
    no_keep = {**cal, "candidates": [cand("x", 0.29, 0.0)]}  # falls back to what the live version recorded
    assert check_regression(no_keep, 0.1, {"old": 0.1, "new": 9.0}).worse == {"old": pytest.approx(0.19)}

    tail = _Tail(LOG_BYTES)
    with tempfile.TemporaryFile() as f:  # what a pipe delivers, more than the log keeps
        f.write(b"x" * 70000 + b"y" * (LOG_BYTES - 10))
        f.seek(0)
        tail.feed(f)
    text = tail.text()
    assert text.endswith("y" * 100) and len(text) < LOG_BYTES + 100 and "earlier bytes not kept" in text
    assert env_value("a\x00b\ud800") == "a\\x00b\\ud800"
