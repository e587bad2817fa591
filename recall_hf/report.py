"""What a merge did (`MergeReport`, saved as `recall_report.json`), its per-layer plot, the output's `recall.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .card import write_merge_card
from .durable import write_json
from .modeldir import PLOT_NAME, RECALL_JSON, REPORT_NAME, weight_hashes
from .privacy import publishable_report


@dataclass
class MergeReport:
    """What a merge did: inputs, per-layer similarities and weights, timings. Saved as `recall_report.json`."""

    out_dir: str
    kind: str
    models: list[str]
    task_counts: list[int]
    output_task_count: int
    config: dict
    probes: list[str]
    similarities: list[list[list[float]]]
    # The merge coefficients per layer and model, `[L+1][K]` (the JSON key `weights` is the report's format).
    weights: list[list[float]]
    input_hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    # The calibrated fold's search (SPEC 2.7): every candidate with per-task scores, the chosen one, the time spent.
    calibration: dict | None = None
    library_version: str = __version__
    created: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def newest_weight(self) -> list[float]:
        """The newest model's weight per layer (0..L)."""
        return [row[-1] for row in self.weights]


def plot_report(report: MergeReport, path: Path) -> None:
    """Per-layer similarity to the target model and per-layer merge weights, one PNG.

    Uses matplotlib's object API, not pyplot, so the caller's backend is left alone (a notebook keeps its inline
    plots; the earlier `matplotlib.use("Agg")` switched it for the whole process)."""
    from matplotlib.figure import Figure

    sims, weights = torch.tensor(report.similarities), torch.tensor(report.weights)
    layers = list(range(len(weights)))
    names = [f"{i}: {Path(m).name}" for i, m in enumerate(report.models)]
    fig = Figure(figsize=(8, 6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for k, name in enumerate(names[:-1]):
        ax1.plot(layers, sims[:, k, -1].tolist(), marker=".", label=f"{name} vs newest")
    ax1.set_ylabel("similarity to newest")
    ax1.set_title(f"RECALL ({report.config.get('similarity')}, tau={report.config.get('tau')})")
    ax1.legend(fontsize=7)
    bottom = torch.zeros(len(layers))
    for k, name in enumerate(names):
        ax2.bar(layers, weights[:, k].tolist(), bottom=bottom.tolist(), label=name)
        bottom += weights[:, k]
    ax2.set_ylabel("merge weight")
    ax2.set_xlabel("layer (0 = embeddings)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(stage: Path, report: MergeReport) -> None:
    """The report, the plot and the output's `recall.json` (task count and provenance)."""
    write_json(stage / REPORT_NAME, publishable_report(report.to_dict(), stage))  # probe texts kept private
    plot_report(report, stage / PLOT_NAME)
    prov = write_merge_card(stage, report)  # README.md for the Hub: tasks, base model, config, per-layer weights
    write_json(
        stage / RECALL_JSON,
        {
            "kind": f"recall-merge-{report.kind}",
            "task_count": report.output_task_count,
            **prov,
            "parents": report.models,
            "created": report.created,
            "library_version": report.library_version,
            "sha256": weight_hashes(stage),
        },
    )
