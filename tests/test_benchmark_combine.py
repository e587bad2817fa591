"""`benchmarks.combine`: per-seed result folders become one table; other setups and repeated seeds are refused."""

import json
from pathlib import Path

import pytest

from benchmarks import combine

REAL = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "minilm-quick" / "results.json"


def _results(seed: int, lr: float | None = None) -> dict:
    """A real one-seed results file, relabelled as `seed` with its seqft ACC moved by seed / 20."""
    results = json.loads(REAL.read_text())
    results["config"].update(seeds=[seed], run_name=f"t-s{seed}")
    if lr is not None:
        results["config"]["lr"] = lr
    for run in results["runs"]:
        run["seed"] = seed
        if run["method"] == "seqft":
            run["metrics"]["ACC"] = 0.7 + seed / 20
    results["timings"] = {str(seed): {"evaluation": 1.0}}
    results["eval_cache"] = {str(seed): {"calls": 1, "hits": 0}}
    results["total_seconds"] = 10.0
    return results


def test_combine_pools_runs_and_summarises_over_seeds(tmp_path):
    parts = []
    for seed in (0, 1, 2):
        folder = tmp_path / f"t-s{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(_results(seed)))
        parts.append(str(folder))
    combine.main([*parts, "--out", str(tmp_path / "t"), "--no-plots"])
    out = json.loads((tmp_path / "t" / "results.json").read_text())
    assert out["config"]["seeds"] == [0, 1, 2]
    assert len(out["runs"]) == 3 * len(_results(0)["runs"]) and set(out["timings"]) == {"0", "1", "2"}
    assert out["total_seconds"] == 30.0
    (row,) = [r for r in out["summary"] if r["method"] == "seqft" and r["protocol"] == "chain"]
    assert row["ACC"] == pytest.approx((0.70 + 0.75 + 0.80) / 3) and row["seeds"] == [0, 1, 2]
    assert (tmp_path / "t" / "results.md").is_file()


def test_combine_refuses_other_setups_and_repeated_seeds():
    with pytest.raises(SystemExit, match="differ in lr"):
        combine.combine([_results(0), _results(1, lr=1.0)])
    with pytest.raises(SystemExit, match=r"seed\(s\) \[0\]"):
        combine.combine([_results(0), _results(0)])
