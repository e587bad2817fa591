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


def summary_rows(results: dict) -> list[dict]:
    """One row per (protocol, method): ACC, BWT, plasticity as mean and std over seeds."""
    rows = []
    groups = _groups(results)
    for protocol, method in sorted(groups, key=_order_key(results)):
        runs = groups[(protocol, method)]
        row = {
            "method": method,
            "protocol": protocol,
            "model": results["config"]["model"] + ("+lora" if results["config"].get("lora") else ""),
            "seeds": [r["seed"] for r in runs],
        }
        for metric in ("ACC", "BWT", "plasticity"):
            row[metric], row[metric + "_std"] = _mean_std([r["metrics"][metric] for r in runs])
        rows.append(row)
    return rows


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


def markdown(results: dict) -> str:
    cfg = results["config"]
    mach = results["machine"]
    rows = results.get("summary") or summary_rows(results)
    tuning = f" (LoRA r={cfg['lora_r']}, folded)" if cfg["lora"] else " (full fine-tuning)"
    lines = [
        f"# Continual benchmark: {cfg['run_name']}",
        "",
        f"Model **{cfg['model']}**{tuning}; "
        f"tasks in order: {', '.join(cfg['tasks'])}; {cfg['train_n']} train / {cfg['test_n']} test examples per task; "
        f"{cfg['epochs']} epoch(s), lr {cfg['lr']:g}, batch {cfg['batch_size']}, max length {cfg['max_length']}; "
        f"seeds {cfg['seeds']}.",
        "Accuracy: "
        + (
            "rank classification (lowest mean token loss among the task's label words)."
            if cfg["model"] == "smollm2"
            else "argmax of the task's own head (one head per task)."
        ),
        f"Machine: {mach['nproc']} cores ({mach['cpu']}), torch {mach['torch']}, transformers "
        f"{mach['transformers']}; total {results.get('total_seconds', 0) / 60:.1f} min.",
        "",
        "ACC = mean final accuracy over all tasks; BWT = mean over earlier tasks of (final − just-learned); "
        "plasticity = mean accuracy on the new task right after its step. Mean ± std over seeds.",
        "",
        "| method | protocol | model | ACC | BWT | plasticity |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = len(r["seeds"])
        lines.append(
            f"| {r['method']} | {r['protocol']} | {r['model']} | {_fmt(r['ACC'], r['ACC_std'], n)} | "
            f"{_fmt(r['BWT'], r['BWT_std'], n)} | {_fmt(r['plasticity'], r['plasticity_std'], n)} |"
        )
    lines += ["", "## Accuracy matrices (rows: after step t; columns: tasks in order; seed mean)", ""]
    groups = _groups(results)
    tasks = cfg["tasks"]
    for protocol, method in sorted(groups, key=_order_key(results)):
        runs = groups[(protocol, method)]
        if "acc" not in runs[0]:
            vals = [statistics.fmean(r["final"][j] for r in runs) for j in range(len(tasks))]
            lines.append(f"- {method}: final " + ", ".join(f"{t} {v:.3f}" for t, v in zip(tasks, vals)))
            continue
        m = mean_matrix(runs)
        lines.append("")
        lines.append(f"**{method}** ({protocol})")
        lines.append("")
        lines.append("| step | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for i, row in enumerate(m):
            cells = [f"{v:.3f}" if v is not None else "" for v in row]
            lines.append(f"| {i + 1} ({tasks[i]}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## RECALL: the new model's per-layer weight at each step (first seed)", ""]
    for run in results["runs"]:
        if run.get("recall") and run.get("family") == "recall" and run["seed"] == cfg["seeds"][0]:
            lines.append(f"- {run['method']} ({run['protocol']}):")
            for rec in run["recall"]:
                w = [row[-1] for row in rec["weights"]]
                lines.append(f"  - step {rec['step']}: " + " ".join(f"{x:.2f}" for x in w))
    calibrated = [r for r in results["runs"] if r.get("family") == "calibrated" and r["seed"] == cfg["seeds"][0]]
    if calibrated:
        lines += ["", "## Calibrated fold: the candidate chosen at steps 2.. (first seed)", ""]
        for run in calibrated:
            picks = ", ".join(f"{rec['chosen']} ({rec['objective']:.4f})" for rec in run["recall"])
            lines.append(f"- {run['method']} ({run['protocol']}): {picks}")
    timings = results.get("timings", {})
    if timings:
        lines += ["", "## Timings (seconds, per seed)", ""]
        for seed, tm in timings.items():
            lines.append(f"- seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()))
    return "\n".join(lines) + "\n"


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
    cols = min(6, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
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
        ax.set_xticks(range(len(tasks)), [t[:6] for t in tasks], fontsize=6)
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
    runs = [r for r in results["runs"] if r.get("recall") and r["seed"] == seed]
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
