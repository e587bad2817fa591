"""Tables and plots of a continual-benchmark results dict (see ``benchmarks/continual.py``).

``python -m benchmarks.report RESULTS_DIR`` rebuilds ``results.md`` and the plots from ``results.json``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

REFERENCES = ("zero-shot base", "base + linear probe", "task models (individual)", "multi-task joint")


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _groups(results: dict) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["protocol"], run["method"]), []).append(run)
    return groups


def _order_key(results: dict):
    chain = results["methods"].get("chain", [])
    fb = results["methods"].get("from-base", [])

    def key(item):
        (protocol, method) = item
        if protocol == "-":
            return (0, REFERENCES.index(method) if method in REFERENCES else 99)
        if protocol == "from-base":
            return (1, fb.index(method) if method in fb else 99)
        return (2, chain.index(method) if method in chain else 99)

    return key


STREAM_METRICS = ("last_new", "last_own", "last_frac", "first_learned", "first_final", "first_held")
SWEEP_KEYS = {"interp": ("alpha", "α"), "ta": ("lam", "λ"), "ties": ("lam", "λ"), "recall": ("tau", "τ")}


def stream_metrics(acc: list[list[float | None]], own: list[float] | None) -> dict[str, float | None]:
    """What a long stream is watched for, from one run's accuracy matrix ``acc[step][task]`` (training order).

    Args:
        acc: accuracy of every task after every step (``None`` before a task is learned).
        own: each task's own fine-tuned model's accuracy (from the base, "task models (individual)"), same order;
            ``None`` when the run has no such reference.

    Returns:
        ``last_new`` (the last task right after its step = at the end), ``last_own`` (its own model),
        ``last_frac`` (their ratio: plasticity at the last step as a fraction of the task's own model),
        ``first_learned`` / ``first_final`` (task 1 right after step 1 / at the end) and ``first_held``
        (``first_final - first_learned``).
    """
    last_new, first_learned, first_final = acc[-1][-1], acc[0][0], acc[-1][0]
    last_own = own[-1] if own else None
    frac = last_new / last_own if last_new is not None and last_own else None
    held = first_final - first_learned if first_final is not None and first_learned is not None else None
    return {
        "last_new": last_new,
        "last_own": last_own,
        "last_frac": frac,
        "first_learned": first_learned,
        "first_final": first_final,
        "first_held": held,
    }


def _own_accuracies(results: dict) -> dict[int, list[float]]:
    """Seed -> the individual task models' accuracies (the "task models (individual)" reference), task order."""
    return {r["seed"]: r["final"] for r in results["runs"] if r["method"] == "task models (individual)"}


def summary_rows(results: dict) -> list[dict]:
    """One row per (protocol, method): ACC, BWT, plasticity and the stream metrics (``stream_metrics``) as mean and
    std over seeds; ``family`` and ``options`` of the method where it has them."""
    rows = []
    groups = _groups(results)
    own = _own_accuracies(results)
    for protocol, method in sorted(groups, key=_order_key(results)):
        runs = groups[(protocol, method)]
        row = {
            "method": method,
            "protocol": protocol,
            "model": results["config"]["model"] + ("+lora" if results["config"].get("lora") else ""),
            "seeds": [r["seed"] for r in runs],
            "family": runs[0].get("family"),
            "options": runs[0].get("options"),
        }
        for metric in ("ACC", "BWT", "plasticity"):
            row[metric], row[metric + "_std"] = _mean_std([r["metrics"][metric] for r in runs])
        if "acc" in runs[0]:
            per_seed = [stream_metrics(r["acc"], own.get(r["seed"])) for r in runs]
            for metric in STREAM_METRICS:
                row[metric], row[metric + "_std"] = _mean_std([m[metric] for m in per_seed])
        rows.append(row)
    return rows


def best_in_hindsight(rows: list[dict]) -> list[dict]:
    """``rows`` with one added row per swept family: the sweep value with the best seed-mean ACC, named.

    A sweep is a group of rows with the same protocol, family (``SWEEP_KEYS``: interp alpha, ta lam, ties lam, recall
    tau) and other options, holding at least two values of the swept key. The added row copies the best member's
    numbers, is labelled e.g. ``interp (best α in hindsight: α=0.7)`` (other options named after the family), carries
    ``hindsight: True`` and ``picked`` (the member's method label), and follows the group's last member. Ties go to
    the member listed first. Pure: the input rows are not changed.
    """
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        fam, opts = r.get("family"), r.get("options")
        if fam not in SWEEP_KEYS or not opts or SWEEP_KEYS[fam][0] not in opts or r["ACC"] is None:
            continue
        key_name = SWEEP_KEYS[fam][0]
        others = tuple(sorted((k, repr(v)) for k, v in opts.items() if k != key_name))
        groups.setdefault((r["protocol"], fam, others), []).append(i)
    extra: dict[int, dict] = {}
    for (_protocol, fam, _others), idx in groups.items():
        key_name, symbol = SWEEP_KEYS[fam]
        if len({rows[i]["options"][key_name] for i in idx}) < 2:
            continue
        best = max(idx, key=lambda i: (rows[i]["ACC"], -i))
        value = f"{rows[best]['options'][key_name]:g}"
        name = _family_name(rows[best], key_name)
        extra[idx[-1]] = {
            **rows[best],
            "method": f"{name} (best {symbol} in hindsight: {symbol}={value})",
            "hindsight": True,
            "picked": rows[best]["method"],
        }
    out = []
    for i, r in enumerate(rows):
        out.append(r)
        if i in extra:
            out.append(extra[i])
    return out


def _family_name(row: dict, key_name: str) -> str:
    """The family with the options that differ from the family's defaults, the swept key left out."""
    from benchmarks.methods import FAMILIES

    defaults = FAMILIES[row["family"]].options
    diff = [f"{k}={v}" for k, v in row["options"].items() if k != key_name and defaults.get(k) != v]
    return row["family"] + (f":{','.join(diff)}" if diff else "")


def _short(task: str) -> str:
    """A short column label: ``news-outlet/2`` -> ``news/2``, ``sentiment`` -> ``sentim``."""
    head, _, sub = task.partition("/")
    return f"{head.split('-')[0][:6]}/{sub}" if sub else task[:6]


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if n > 1 else "")


def mean_matrix(runs: list[dict]) -> list[list[float | None]]:
    """Seed-mean accuracy matrix (``None`` where no value)."""
    T = len(runs[0]["acc"])
    out = []
    for i in range(T):
        row = []
        for j in range(T):
            vals = [r["acc"][i][j] for r in runs if r["acc"][i][j] is not None]
            row.append(statistics.fmean(vals) if vals else None)
        out.append(row)
    return out


def accuracy_meaning(cfg: dict) -> str:
    """What a run's accuracies measure (decoders: `--lm-metric`; runs before it existed used rank classification)."""
    if cfg["model"] != "smollm2":
        return "argmax of the task's own head (one head per task)."
    if cfg.get("lm_metric", "rank") == "greedy":
        return ("exact match of greedy generation (the greedy continuation starts with the right label word's "
                "tokens; argmax over the whole vocabulary).")
    return "rank classification (lowest mean token loss among the task's label words)."


def markdown(results: dict) -> str:
    cfg = results["config"]
    rows = best_in_hindsight(results.get("summary") or summary_rows(results))
    lines = _header(results) + _summary_table(rows) + _stream_table(rows, cfg["tasks"])
    lines += _matrices(results) + _fold_sections(results) + _timings(results)
    return "\n".join(lines) + "\n"


def _header(results: dict) -> list[str]:
    """Title, settings, machine and what the columns mean."""
    cfg, mach = results["config"], results["machine"]
    tuning = f" (LoRA r={cfg['lora_r']}, folded)" if cfg["lora"] else " (full fine-tuning)"
    return [
        f"# Continual benchmark: {cfg['run_name']}",
        "",
        f"Model **{cfg['model']}**{tuning}; "
        f"tasks in order: {', '.join(cfg['tasks'])}; {cfg['train_n']} train / {cfg['test_n']} test examples per task; "
        f"{cfg['epochs']} epoch(s), lr {cfg['lr']:g}, batch {cfg['batch_size']}, max length {cfg['max_length']}; "
        f"seeds {cfg['seeds']}.",
        "Accuracy: " + accuracy_meaning(cfg),
        f"Machine: {mach['nproc']} cores ({mach['cpu']}), torch {mach['torch']}, transformers "
        f"{mach['transformers']}; total {results.get('total_seconds', 0) / 60:.1f} min.",
        "",
        "ACC = mean final accuracy over all tasks; BWT = mean over earlier tasks of (final − just-learned); "
        "plasticity = mean accuracy on the new task right after its step. Mean ± std over seeds. "
        'A "best in hindsight" row repeats the sweep value with the best mean ACC (picked after seeing the '
        "test accuracies: an upper bound for a fixed rule, not a method).",
        "",
    ]


def _summary_table(rows: list[dict]) -> list[str]:
    lines = ["| method | protocol | model | ACC | BWT | plasticity |", "|---|---|---|---|---|---|"]
    for r in rows:
        n = len(r["seeds"])
        lines.append(
            f"| {r['method']} | {r['protocol']} | {r['model']} | {_fmt(r['ACC'], r['ACC_std'], n)} | "
            f"{_fmt(r['BWT'], r['BWT_std'], n)} | {_fmt(r['plasticity'], r['plasticity_std'], n)} |"
        )
    return lines


def _matrices(results: dict) -> list[str]:
    """Each method's accuracy matrix (seed mean), or its final accuracies when it has no steps."""
    lines = ["", "## Accuracy matrices (rows: after step t; columns: tasks in order; seed mean)", ""]
    groups = _groups(results)
    tasks = results["config"]["tasks"]
    for protocol, method in sorted(groups, key=_order_key(results)):
        runs = groups[(protocol, method)]
        if "acc" not in runs[0]:
            vals = [statistics.fmean(r["final"][j] for r in runs) for j in range(len(tasks))]
            lines.append(f"- {method}: final " + ", ".join(f"{t} {v:.3f}" for t, v in zip(tasks, vals)))
            continue
        lines += ["", f"**{method}** ({protocol})", "", "| step | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for i, row in enumerate(mean_matrix(runs)):
            cells = [f"{v:.3f}" if v is not None else "" for v in row]
            lines.append(f"| {i + 1} ({tasks[i]}) | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _fold_sections(results: dict) -> list[str]:
    """First seed: RECALL's per-layer weight of the new model at each step, and each calibrated fold's choices."""
    first = results["config"]["seeds"][0]
    lines = ["## RECALL: the new model's per-layer weight at each step (first seed)", ""]
    for run in results["runs"]:
        if run.get("recall") and run.get("family") == "recall" and run["seed"] == first:
            lines.append(f"- {run['method']} ({run['protocol']}):")
            for rec in run["recall"]:
                w = [row[-1] for row in rec["weights"]]
                lines.append(f"  - step {rec['step']}: " + " ".join(f"{x:.2f}" for x in w))
    calibrated = [r for r in results["runs"] if r.get("family") == "calibrated" and r["seed"] == first]
    if calibrated:
        lines += ["", "## Calibrated fold: the candidate chosen at steps 2.. (first seed)", ""]
        for run in calibrated:
            picks = ", ".join(f"{rec['chosen']} ({rec['objective']:.4f})" for rec in run["recall"])
            lines.append(f"- {run['method']} ({run['protocol']}): {picks}")
    return lines


def _timings(results: dict) -> list[str]:
    timings = results.get("timings", {})
    if not timings:
        return []
    return ["", "## Timings (seconds, per seed)", ""] + [
        f"- seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()) for seed, tm in timings.items()]


def _stream_table(rows: list[dict], tasks: list[str]) -> list[str]:
    """The long-stream table: the last task against its own model, the first task at the end against step 1."""
    rows = [r for r in rows if r.get("last_new") is not None and not r.get("hindsight")]
    if not rows:
        return []
    lines = [
        "",
        f"## Stream: the last task ({tasks[-1]}) and the first ({tasks[0]})",
        "",
        "last task = its accuracy at the end (right after its own step); own model = the task fine-tuned alone from "
        "the base; last / own = plasticity at the last step as a fraction of its own model (target >= 0.90); "
        "first task: accuracy right after step 1, at the end, and the change (held = final − learned).",
        "",
        "| method | protocol | last task | own model | last / own | first learned | first final | first held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = len(r["seeds"])
        cells = [_fmt(r[m], r[m + "_std"], n) for m in STREAM_METRICS]
        lines.append(f"| {r['method']} | {r['protocol']} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(results: dict, path: Path) -> None:
    plt = _plt()
    groups = _groups(results)
    items = [k for k in sorted(groups, key=_order_key(results)) if "acc" in groups[k][0]]
    if not items:
        return
    tasks = results["config"]["tasks"]
    cols = min(6 if len(tasks) <= 6 else 3, len(items))
    rows = math.ceil(len(items) / cols)
    size = max(2.6, 0.42 * len(tasks))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (protocol, method) in zip(axes.flat, items):
        m = mean_matrix(groups[(protocol, method)])
        data = [[v if v is not None else float("nan") for v in row] for row in m]
        ax.axis("on")
        ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_title(f"{method}\n({protocol})", fontsize=7)
        ax.set_xticks(range(len(tasks)), [_short(t) for t in tasks], fontsize=6, rotation=90 if len(tasks) > 6 else 0)
        ax.set_yticks(range(len(tasks)), [str(i + 1) for i in range(len(tasks))], fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acc_bwt(results: dict, path: Path) -> None:
    plt = _plt()
    rows = [r for r in (results.get("summary") or summary_rows(results)) if r["BWT"] is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 6))
    colors = {"chain": "tab:red", "from-base": "tab:blue"}
    for r in rows:
        color = colors.get(r["protocol"], "k")
        marker = "*" if r["method"].startswith("recall") else "o"
        ax.errorbar(
            r["BWT"],
            r["ACC"],
            xerr=r["BWT_std"] or 0,
            yerr=r["ACC_std"] or 0,
            fmt=marker,
            color=color,
            ms=8 if marker == "*" else 5,
            alpha=0.8,
        )
        ax.annotate(r["method"], (r["BWT"], r["ACC"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for r in results.get("summary") or summary_rows(results):
        if r["protocol"] == "-" and r["ACC"] is not None:
            ax.axhline(r["ACC"], ls=":", color="gray", lw=0.8)
            ax.annotate(r["method"], (ax.get_xlim()[0], r["ACC"]), fontsize=6, color="gray")
    ax.set_xlabel("BWT (final − just-learned, mean over earlier tasks)")
    ax.set_ylabel("ACC (mean final accuracy)")
    ax.set_title("ACC vs BWT (red: chain, blue: from-base; stars: RECALL)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _retention(run: dict) -> float:
    """Mean final accuracy on the tasks before the last one."""
    final = run["acc"][-1][:-1]
    return statistics.fmean(final)


def plot_front(results: dict, path: Path) -> None:
    """Retention (final accuracy on earlier tasks) vs plasticity: RECALL tau sweep vs interpolation alpha sweep."""
    plt = _plt()
    groups = _groups(results)
    protocols = [p for p in ("chain", "from-base") if any(k[0] == p for k in groups)]
    if not protocols:
        return
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 5), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        series: dict[str, list[tuple[float, float, str]]] = {}
        for (p, method), runs in groups.items():
            if p != protocol or "acc" not in runs[0]:
                continue
            fam = runs[0]["family"]
            opts = runs[0]["options"]
            if fam == "recall":
                others = {k: v for k, v in opts.items() if k != "tau"}
                from benchmarks.methods import FAMILIES

                defaults = {k: v for k, v in FAMILIES["recall"].options.items() if k != "tau"}
                name = "RECALL tau sweep" if others == defaults else None
                tag = f"τ={opts['tau']:g}"
                if name is None:
                    name, tag = "RECALL variants", method.replace("recall:", "")
            elif fam == "interp":
                name, tag = "interpolation alpha sweep", f"α={opts['alpha']:g}"
            else:
                name, tag = "other", method
            x = statistics.fmean(r["metrics"]["plasticity"] for r in runs)
            y = statistics.fmean(_retention(r) for r in runs)
            series.setdefault(name, []).append((x, y, tag))
        styles = {
            "RECALL tau sweep": ("tab:red", "*-"),
            "interpolation alpha sweep": ("tab:blue", "o-"),
            "RECALL variants": ("tab:orange", "*"),
            "other": ("gray", "s"),
        }
        for name, pts in series.items():
            color, fmt = styles[name]
            if "-" in fmt:
                pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, color=color, label=name, ms=7)
            for x, y, tag in pts:
                ax.annotate(tag, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("plasticity (new-task accuracy at its step)")
        ax.set_ylabel("retention (final accuracy on earlier tasks)")
        ax.set_title(f"retention / plasticity front ({protocol})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall_weights(results: dict, path: Path) -> None:
    """The new model's per-layer RECALL weight (and coefficient for tv=1) at each step, first seed."""
    plt = _plt()
    seed = results["config"]["seeds"][0]
    runs = [r for r in results["runs"] if r.get("recall") and r.get("family") == "recall" and r["seed"] == seed]
    if not runs:
        return
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, run in zip(axes.flat, runs):
        ax.axis("on")
        for rec in run["recall"]:
            w = [row[-1] for row in rec["weights"]]
            ax.plot(range(len(w)), w, marker=".", label=f"step {rec['step']}")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{run['method']} ({run['protocol']})", fontsize=7)
        ax.set_xlabel("layer (0 = embeddings)", fontsize=7)
        ax.set_ylabel("weight of new model", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    plot_heatmaps(results, out_dir / "accuracy_matrices.png")
    plot_acc_bwt(results, out_dir / "acc_vs_bwt.png")
    plot_front(results, out_dir / "retention_plasticity_front.png")
    plot_recall_weights(results, out_dir / "recall_layer_weights.png")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.report RESULTS_DIR (holding results.json)")
    out = Path(argv[0])
    results = json.loads((out / "results.json").read_text())
    results["summary"] = summary_rows(results)
    (out / "results.md").write_text(markdown(results))
    plots(results, out)
    print(f"wrote {out / 'results.md'} and plots")


if __name__ == "__main__":
    main()
