"""Each version's `version.json` (lineage, machine-readable) and Hub model card `README.md` (`recall_hf.card`:
YAML metadata `ModelCard.load` parses, and the same lineage for people).

Both are cumulative: a version lists every task folded in since the base, with its content hash, when it was
folded, and a summary of the per-layer weight the new task got in that merge.
"""

from __future__ import annotations

import json
from pathlib import Path

from recall_hf.card import PAPER, CardInfo, input_base, weights_summary, write_card
from recall_hf.durable import write_json
from recall_hf.modeldir import ADAPTER_CONFIG, REPORT_NAME, read_recall_json

from .gate import plot_retention, retention_table
from .store import VERSION_INFO

RETENTION_PLOT = "recall_retention.png"  # published with the version: task and version names, numbers, no text


def weight_summary(weights: list[list[float]]) -> dict:
    """The newest model's share per layer (0 = embeddings) in one merge, with min/mean/max."""
    return {"per_layer": [round(float(row[-1]), 4) for row in weights], **weights_summary(weights)}


def version_info(version: str, parent: str | None, created: str, task_count: int, tasks: list[dict],
                 kind: str, source: str | None = None) -> dict:
    return {"version": version, "parent": parent, "created": created, "kind": kind, "task_count": task_count,
            "source": source, "tasks": tasks}


def history_table(tasks: list[dict]) -> str:
    """One row per task folded in: content hash, when, into which version, the new task's weight per layer."""
    lines = [
        "| # | task | content hash | folded | version | new task's weight (min / mean / max) | per layer |",
        "|---|------|--------------|--------|---------|--------------------------------------|-----------|",
    ]
    for i, t in enumerate(tasks, 1):
        w = t.get("weights") or {}
        per_layer = " ".join(f"{x:.2f}" for x in w.get("per_layer", []))
        summary = f"{w['min']:.2f} / {w['mean']:.2f} / {w['max']:.2f}" if w else "-"
        lines.append(f"| {i} | {t['task']} | `{t['hash'][:16]}` | {t['time']} | {t['version']} | {summary} | "
                     f"{per_layer} |")
    lines += ["", "Weights: the share the new task's model got at each layer (0 = embeddings) when it was folded in; "
              "the rest went to the deployed model of that time."]
    return "\n".join(lines)


def card_info(info: dict, stage: Path | None = None) -> CardInfo:
    """The Hub card of a version: its tasks and lineage, plus the last merge's config and weights when present."""
    report = read_json(stage / REPORT_NAME) if stage is not None else {}
    meta = read_recall_json(stage) if stage is not None else {}
    summary = (f"Published {info['created']} by recall-daemon; "
               + (f"merged from {info['parent']} with [RECALL]({PAPER})." if info.get("parent")
                  else f"the base model ({Path(info.get('source') or 'unknown source').name}).")
               + " Every version is immutable; `DEPLOY/current` points at the live one and `recall-hf rollback` "
               "flips it back.")
    sections = [("History", history_table(info["tasks"]))] if info["tasks"] else []
    if info.get("retention"):
        sections.append(("Retention", retention_section(info["retention"])))
    kind = "adapter" if stage is not None and (stage / ADAPTER_CONFIG).is_file() else "full"
    labels = ["deployed", "new task"] if report.get("weights") else []
    return CardInfo(title=f"recall-hf deployed model {info['version']}", kind=kind,
                    tasks=[t["task"] for t in info["tasks"]], base_model=input_base(stage) if stage else None,
                    config=report.get("config") or {}, weights=report.get("weights"), labels=labels,
                    summary=summary, task_count=info.get("task_count") or meta.get("task_count"), sections=sections)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def retention_section(history: list[dict]) -> str:
    """Each folded task's fingerprint divergence across the versions of this lineage, table and plot."""
    return (f"![each task's divergence across versions]({RETENTION_PLOT})\n\n" + retention_table(history)
            + "\nFingerprint divergence (KL, nats) between each task's own fine-tuned model and the version on that "
            "task's typical samples: lower keeps more of the task. A rising row is a task slipping. All versions: "
            "`retention` in `version.json`.")


def write_version_files(stage: Path, info: dict) -> None:
    write_json(stage / VERSION_INFO, info)
    if info.get("retention"):
        plot_retention(info["retention"], stage / RETENTION_PLOT)
    write_card(stage, card_info(info, stage))
