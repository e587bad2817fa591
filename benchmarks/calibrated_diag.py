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
import math
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


class NotStored(LookupError):
    """The search asked for a fold the run did not score."""


def replay_search(rec: dict) -> tuple[str, int]:
    """The library's default search (`recall_hf.calibrate.search_fold`, minimax, tasks equal, constant line only as
    in the benchmark) run again on one step's stored divergences instead of replays: the fold it picks and how many
    candidates it scored. A one-weight model stands in for the working model (its weight is the fold's `a`), and a
    scorer looks each `a` up in the record; `NotStored` when the search asks for a fold the run did not score."""
    import torch

    from recall_hf import calibrate as C
    from recall_hf.fingerprint import TaskScore

    div = rec["divergence"]
    from_base = "constant:1" in div  # the chain's a=1 is N itself; from one base N lies off the line
    names = {0.0: "keep", 1.0: "constant:1" if from_base else "new"}
    model = torch.nn.Linear(1, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)

    def scorer(m, fps):
        a = round(float(m.weight.detach()), 6)
        name = names.get(a, f"constant:{a:g}")
        if name not in div:
            raise NotStored(name)
        return {t: TaskScore(v, 0.0) for t, v in div[name].items()}

    tasks = list(div["keep"])
    goal = C.Objective(C.task_weights(tasks, None), "minimax", dict(rec["scales"]))
    fps = {t: type("Stored", (), {"lengths": torch.ones(1)})() for t in tasks}
    search = C.FoldSearch(model, {"weight": torch.ones(1, 1, dtype=torch.float64)}, {"weight": 0}, 1, fps, goal,
                          scorer=scorer)
    if from_base:  # N as it is, scored beside the line (its objective is set when the endpoints anchor it)
        scores = {t: {"divergence": v} for t, v in div["new"].items()}
        search.register(C.Candidate("new", "new", None, None, scores, math.inf), None)
    chosen = C.search_fold(search, None, C.CalibrationConfig(scales=(), rule="minimax"), 1)
    return chosen.name, len(search.candidates)


def search_lines(steps: list[tuple[str, int, dict]]) -> list[str]:
    """How the library's search (`replay_search`) does on the stored steps, against the best stored candidate."""
    same, scored, stored, outside = 0, [], [], 0
    for _, _, rec in steps:
        value = minimax(rec["divergence"], rec["scales"])
        try:
            pick, n = replay_search(rec)
        except NotStored:
            outside += 1
            continue
        same += pick == min(value, key=value.get)
        scored.append(n)
        stored.append(len(value))
    if not scored:
        return ["The library's search asked for folds no run scored at every step: no replay."]
    return [f"The library's search (`replay_search`: minimax, constant line, quadratic refinement) run on the stored "
            f"divergences picks the best stored candidate in {same} of {len(scored)} steps, scoring "
            f"{statistics.fmean(scored):.2f} candidates where the run scored {statistics.fmean(stored):.2f}"
            + (f"; {outside} step(s) asked for a fold the run did not score." if outside else ".")]


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
    lines += ["", *search_lines(steps)]
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
