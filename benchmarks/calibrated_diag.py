"""What other objectives would have picked, from runs of the calibrated fold with ``diag=1``.

A run with ``calibrated:...,diag=1`` records, at every step, each candidate fold's test accuracy on every task so far,
its fingerprint KL on the typical samples (the objective's input), its KL on unused training examples of each task
(held-out fingerprints), and its top-1 agreement with each task model on both. This script re-picks every step's fold
under each objective below and reports the test accuracy of the pick (mean over the tasks so far), against the fixed
share a=0.5 (the candidate ``constant:0.5``: in the chain ``D + 0.5 (N - D)``, the fold of interpolation α=0.5; from
one base ``D + 0.5 (N - base)``, the new task vector at λ=0.5) and the best candidate in hindsight (an upper bound).

It replays one decision at a time on the path the run took: a different pick would have changed the later steps, so
the table ranks objectives by how well they pick, not by the ACC they would have reached.

    python -m benchmarks.calibrated_diag benchmarks/results/diag-minilm-s0 benchmarks/results/diag-minilm-s1
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

from recall_hf.calibrate import minimax_regret

Measure = Mapping[str, Mapping[str, float]]  # candidate -> task -> loss (lower is better)


def minimax(loss: Measure, scales: Mapping[str, float] | None) -> dict[str, float]:
    """The library's `minimax_regret` of every candidate, tasks weighted equally: the largest over tasks of its loss
    above the task's better endpoint, divided by the task's scale."""
    tasks = list(loss["keep"])
    floor = {t: min(loss["keep"][t], loss["new"][t]) for t in tasks}
    scales = scales or dict.fromkeys(tasks, 1.0)
    return {c: minimax_regret(v, floor, scales, dict.fromkeys(tasks, 1.0)) for c, v in loss.items()}


def mean(loss: Measure, scales: Mapping[str, float] | None) -> dict[str, float]:
    """Mean over tasks of a candidate's loss divided by the task's scale."""
    return {c: statistics.fmean(x / (scales[t] if scales else 1.0) for t, x in v.items()) for c, v in loss.items()}


def measures(rec: dict) -> dict[str, tuple[Measure, Mapping[str, float] | None]]:
    """Each loss the record holds per candidate and task, with the scales it is divided by (None: unscaled)."""
    diag = rec["diag"]
    disagree = {c: {t: 1.0 - a for t, a in d["agree"].items()} for c, d in diag.items()}
    disagree_h = {c: {t: 1.0 - a for t, a in d["agree_heldout"].items()} for c, d in diag.items()}
    return {
        "KL typical": (rec["divergence"], rec["scales"]),
        "KL held-out": ({c: d["heldout"] for c, d in diag.items()}, rec["diag_scales"]),
        "disagreement typical": (disagree, None),
        "disagreement held-out": (disagree_h, None),
    }


RULES: dict[str, Callable[[Measure, Mapping[str, float] | None], dict[str, float]]] = {"minimax": minimax,
                                                                                        "mean": mean}


def step_rows(rec: dict) -> dict[str, tuple[str, float]]:
    """Each objective's pick at one step and the pick's mean test accuracy over the tasks so far."""
    acc = {c: statistics.fmean(d["acc"].values()) for c, d in rec["diag"].items()}
    tie = minimax(rec["divergence"], rec["scales"])  # ties (discrete agreement) go to the default objective
    out = {"chosen by the run": (rec["chosen"], acc[rec["chosen"]]), "fixed a=0.5": ("constant:0.5",
                                                                                          acc["constant:0.5"])}
    for mname, (loss, scales) in measures(rec).items():
        for rname, rule in RULES.items():
            value = rule(loss, scales)
            pick = min(value, key=lambda c: (round(value[c], 12), tie[c]))
            out[f"{rname}, {mname}"] = (pick, acc[pick])
    best = max(acc, key=acc.get)
    out["best candidate in hindsight"] = (best, acc[best])
    return out


def load_steps(dirs: list[Path]) -> list[tuple[str, int, dict]]:
    steps = []
    for d in dirs:
        runs = json.loads((d / "results.json").read_text())["runs"]
        for run in runs:
            for i, rec in enumerate(run.get("recall") or [], 2):
                if isinstance(rec, dict) and "diag" in rec:
                    steps.append((f"{d.name} seed {run['seed']} {run['protocol']}", i, rec))
    return steps


def report(dirs: list[Path]) -> str:
    steps = load_steps(dirs)
    if not steps:
        raise SystemExit("No step with diagnostics found: run the benchmark with calibrated:...,diag=1.")
    rows = [step_rows(rec) for _, _, rec in steps]
    base = [r["fixed a=0.5"][1] for r in rows]
    lines = [f"{len(steps)} fold decisions from {len(dirs)} run(s).", "",
             "| objective | mean test acc. of the pick | vs fixed a=0.5 | wins / ties / losses |",
             "|---|---|---|---|"]
    for name in rows[0]:
        accs = [r[name][1] for r in rows]
        diff = [a - b for a, b in zip(accs, base)]
        wins = sum(d > 1e-9 for d in diff), sum(abs(d) <= 1e-9 for d in diff), sum(d < -1e-9 for d in diff)
        lines.append(f"| {name} | {statistics.fmean(accs):.4f} | {statistics.fmean(diff):+.4f} | "
                     f"{wins[0]} / {wins[1]} / {wins[2]} |")
    lines += ["", "Picks per step:", ""]
    names = list(rows[0])
    lines.append("| run | step | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for (run, i, _), r in zip(steps, rows):
        cells = [f"{r[n][0].replace('constant:', '')} ({r[n][1]:.3f})" for n in names]
        lines.append(f"| {run} | {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="result folders of runs with calibrated:...,diag=1")
    ap.add_argument("--out", type=Path, help="also write the report to this Markdown file")
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.runs if not (d / "results.json").is_file()]
    if missing:
        raise SystemExit(f"No results.json in {', '.join(missing)}: pass benchmark result folders.")
    text = report(args.runs)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
