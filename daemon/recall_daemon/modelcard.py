"""Each version's `version.json` (lineage, machine-readable) and model card `README.md` (the same, for people).

Both are cumulative: a version lists every task folded in since the base, with its content hash, when it was
folded, and a summary of the per-layer weight the new task got in that merge.
"""

from __future__ import annotations

from pathlib import Path

from recall_hf.durable import write_json

from .store import VERSION_INFO


def weight_summary(weights: list[list[float]]) -> dict:
    """The newest model's share per layer (0 = embeddings) in one merge, with min/mean/max."""
    newest = [round(float(row[-1]), 4) for row in weights]
    return {"per_layer": newest, "min": min(newest), "mean": round(sum(newest) / len(newest), 4), "max": max(newest)}


def version_info(version: str, parent: str | None, created: str, task_count: int, tasks: list[dict],
                 kind: str, source: str | None = None) -> dict:
    return {"version": version, "parent": parent, "created": created, "kind": kind, "task_count": task_count,
            "source": source, "tasks": tasks}


def render_card(info: dict) -> str:
    lines = [
        f"# recall-hf deployed model {info['version']}",
        "",
        f"Published {info['created']} by recall-daemon; "
        + (f"merged from {info['parent']} with RECALL (arXiv 2510.20479)." if info.get("parent")
           else f"the base model ({info.get('source') or 'unknown source'})."),
        "",
        f"Tasks folded in so far: {len(info['tasks'])}. Every version is immutable; `DEPLOY/current` points at the "
        "live one and `recall-hf rollback` flips it back.",
        "",
    ]
    if info["tasks"]:
        lines += [
            "| # | task | content hash | folded | version | new task's weight (min / mean / max) | per layer |",
            "|---|------|--------------|--------|---------|--------------------------------------|-----------|",
        ]
        for i, t in enumerate(info["tasks"], 1):
            w = t.get("weights") or {}
            per_layer = " ".join(f"{x:.2f}" for x in w.get("per_layer", []))
            summary = f"{w['min']:.2f} / {w['mean']:.2f} / {w['max']:.2f}" if w else "-"
            lines.append(f"| {i} | {t['task']} | `{t['hash'][:16]}` | {t['time']} | {t['version']} | {summary} | "
                         f"{per_layer} |")
        lines += ["", "Weights: the share the new task's model got at each layer (0 = embeddings) when it was "
                  "folded in; the rest went to the deployed model of that time. Details per merge: "
                  "`recall_report.json`, `recall_weights.png`."]
    else:
        lines.append("No task folded in yet.")
    return "\n".join(lines) + "\n"


def write_version_files(stage: Path, info: dict) -> None:
    write_json(stage / VERSION_INFO, info)
    (stage / "README.md").write_text(render_card(info))
