"""Combine continual-benchmark runs of the same setup but different seeds into one results folder.

A seed per process saves each seed's results as soon as it ends (`benchmarks/continual.py` writes `results.json`
only when all of its seeds are done), so a long multi-seed table survives an interrupted run:

    for s in 0 1 2; do python -m benchmarks.continual --seeds $s --run-name mytable-s$s ...; done
    python -m benchmarks.combine benchmarks/results/mytable-s0 benchmarks/results/mytable-s1 \
        benchmarks/results/mytable-s2 --out benchmarks/results/mytable

The runs must agree on everything but the seeds (model, tasks, sizes, methods); a mismatch is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import report

# Settings that may differ between the combined runs.
PER_RUN = {"seeds", "run_name", "threads", "dry_run", "plots", "progress", "log_level", "out_root"}


def _load(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"combine: {path} not found; pass folders written by `python -m benchmarks.continual`.")
    return json.loads(path.read_text())


def _setup(results: dict) -> dict:
    return {k: v for k, v in results["config"].items() if k not in PER_RUN}


def combine(parts: list[dict]) -> dict:
    """One results dict holding every part's runs; the parts must share their setup and not share seeds."""
    first = parts[0]
    seeds: list = []
    for part in parts:
        diff = sorted(k for k in set(_setup(first)) | set(_setup(part))
                      if _setup(first).get(k) != _setup(part).get(k))
        if diff:
            raise SystemExit(f"combine: the runs differ in {', '.join(diff)}; only seeds may differ.")
        overlap = set(seeds) & set(part["config"]["seeds"])
        if overlap:
            raise SystemExit(f"combine: seed(s) {sorted(overlap)} appear in more than one run.")
        seeds += part["config"]["seeds"]
    out = dict(first)
    out["config"] = {**first["config"], "seeds": seeds}
    out["runs"] = [run for part in parts for run in part["runs"]]
    for key in ("timings", "eval_cache"):
        out[key] = {k: v for part in parts for k, v in part.get(key, {}).items()}
    out["total_seconds"] = sum(part.get("total_seconds", 0.0) for part in parts)
    out["summary"] = report.summary_rows(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.combine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="results folders of the per-seed runs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the combined results")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    results = combine([_load(f) for f in args.folders])
    results["config"]["run_name"] = args.out.name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "results.md").write_text(report.markdown(results))
    if not args.no_plots:
        report.plots(results, args.out)
    print(f"combined {len(args.folders)} runs (seeds {results['config']['seeds']}) into {args.out}")


if __name__ == "__main__":
    main()
