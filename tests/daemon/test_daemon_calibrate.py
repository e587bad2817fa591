"""The daemon with `[recall] calibrate = true` (SPEC 2.7): each version carries every folded task's fingerprint and
the next drop is scored against all of them."""

from __future__ import annotations

import json

from daemon_helpers import SAMPLES, make_drop

from recall_hf.config import RecallConfig
from recall_hf.fingerprint import read_fingerprints
from recall_hf.task_checkpoint import make_task_checkpoint

pytest_plugins = ["daemon_fixtures"]


def _task_drop(dep, name: str, seed: int):
    d = make_drop(dep.drop, name, dep.base, seed=seed, ready=False, recall_json=False, samples=None)
    return make_task_checkpoint(d, SAMPLES, task=name, config=RecallConfig(k=3))


def test_calibrated_versions_carry_every_fingerprint(deployment):
    dep = deployment
    _task_drop(dep, "alpha", 1)
    _task_drop(dep, "beta", 2)
    assert dep.run_once(recall={"calibrate": True, "k": 3}) == 0
    store = dep.store
    assert store.current() == "v0002"
    assert sorted(read_fingerprints(store.version_dir("v0001"))) == ["alpha"]
    assert sorted(read_fingerprints(store.version_dir("v0002"))) == ["alpha", "beta"]
    report = json.loads((store.version_dir("v0002") / "recall_report.json").read_text())
    assert report["calibration"]["protocol"] == "chain"
    assert all(sorted(c["scores"]) == ["alpha", "beta"] for c in report["calibration"]["candidates"]
               if not c["pruned"])  # a pruned candidate keeps only the tasks it finished
