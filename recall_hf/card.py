"""Hub model cards for every recall-hf output (merge, fold, daemon version): YAML metadata the Hub reads and a body
people read, built with `huggingface_hub.ModelCard` so `ModelCard.load` parses them back.

A card never holds training text: no typical samples, no probes (they live in `_recall_private/`, see
`privacy.py`). It names the folded tasks, the base model (a Hub id only; a local path is no use on the Hub), the
merge configuration and a summary of the per-layer weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .hub import hub_id_of, input_labels
from .modeldir import ADAPTER_CONFIG, FINGERPRINT_NAME, FINGERPRINTS_DIR, read_recall_json
from .privacy import PRIVATE_DIR

CARD_NAME = "README.md"
TAGS = ["merge", "recall"]
PAPER = "https://arxiv.org/abs/2510.20479"


@dataclass
class CardInfo:
    """What a card says. `weights` is `[L+1][K]` (layer x input, rows sum to 1), `labels` names the K inputs."""

    title: str
    kind: str  # "full" or "adapter"
    tasks: list[str]
    base_model: str | None = None
    config: dict = field(default_factory=dict)
    weights: list[list[float]] | None = None
    labels: list[str] = field(default_factory=list)
    summary: str = ""
    task_count: int | None = None  # tasks carried, when more are known than named (default: len(tasks))
    sections: list[tuple[str, str]] = field(default_factory=list)  # extra (heading, markdown) sections


def weights_summary(weights: list[list[float]]) -> dict:
    """The newest input's (last column's) weight per layer: min, mean, max."""
    newest = [float(row[-1]) for row in weights]
    return {"min": round(min(newest), 4), "mean": round(sum(newest) / len(newest), 4), "max": round(max(newest), 4)}


def card_metadata(info: CardInfo):
    """The YAML block: `base_model` (Hub ids only), `library_name`, `tags`, and a `recall` section."""
    from huggingface_hub import ModelCardData

    recall = {"paper": PAPER, "tasks": list(info.tasks), "task_count": info.task_count or len(info.tasks)}
    if info.config:
        recall["config"] = dict(info.config)
    if info.weights:
        recall["newest_weight"] = weights_summary(info.weights)
    tags = TAGS + (["lora", "peft"] if info.kind == "adapter" else [])
    return ModelCardData(base_model=hub_id_of(info.base_model), library_name=library_name(info.kind), tags=tags,
                         recall=recall)


def library_name(kind: str) -> str:
    return "peft" if kind == "adapter" else "transformers"


def weights_table(weights: list[list[float]], labels: list[str]) -> str:
    """Markdown table: one row per layer (0 = embeddings), one column per input."""
    labels = labels or [f"model {k}" for k in range(len(weights[0]))]
    head = "| layer | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
    return head + "".join(f"| {i} | " + " | ".join(f"{w:.3f}" for w in row) + " |\n" for i, row in enumerate(weights))


def usage(kind: str) -> str:
    if kind == "adapter":
        return ("```python\nfrom peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM."
                "from_pretrained(\"THIS_REPO\")  # or this folder\n```")
    return "```python\nfrom transformers import AutoModel\n\nmodel = AutoModel.from_pretrained(\"THIS_REPO\")\n```"


def card_body(info: CardInfo) -> str:
    tasks = "\n".join(f"{i}. {t}" for i, t in enumerate(info.tasks, 1)) or "No task folded in yet."
    parts = [f"# {info.title}", info.summary or f"Merged with [RECALL]({PAPER}) by recall-hf.",
             "## Tasks folded in", tasks]
    if info.config:
        parts += ["## Merge configuration", "```yaml\n" + yaml.safe_dump(info.config, sort_keys=True).strip()
                  + "\n```"]
    if info.weights:
        parts += ["## Per-layer weights", "The share each input got at each layer (0 = embeddings).",
                  weights_table(info.weights, info.labels).strip()]
    for heading, text in info.sections:
        parts += [f"## {heading}", text.strip()]
    parts += ["## Usage", usage(info.kind), "## Files",
              "`recall_report.json`: similarities, weights, input hashes and timings (probe texts only as sha256). "
              f"`{PRIVATE_DIR}/` holds training text (typical samples, probes, task fingerprints): private to the "
              "deployment. "
              "`Trainer.push_to_hub` skips names starting with `_`; with `hf upload` add `--exclude \"_*\"`."]
    return "\n\n".join(parts) + "\n"


def render_card(info: CardInfo):
    """A `huggingface_hub.ModelCard` (metadata block + body)."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{card_metadata(info).to_yaml()}\n---\n\n{card_body(info)}")


def write_card(out_dir: str | Path, info: CardInfo) -> Path:
    path = Path(out_dir) / CARD_NAME
    render_card(info).save(path)
    return path


# ---- What the inputs of a merge say about themselves ---------------------------------------------------------------


def input_tasks(model_dir: Path) -> list[str]:
    """Tasks a merge input carries: a merged model's `tasks`, a task checkpoint's `task`, else none known."""
    meta = read_recall_json(model_dir)
    if isinstance(meta.get("tasks"), list):
        return [str(t) for t in meta["tasks"]]
    if meta.get("task"):
        return [str(meta["task"])]
    return []


def input_base(model_dir: Path) -> str | None:
    """The base model an input names: `recall.json` (`base`, `base_model`, `source`), else its adapter config."""
    meta = read_recall_json(model_dir)
    for key in ("base_model", "base", "source"):
        if meta.get(key):
            return str(meta[key])
    if (model_dir / ADAPTER_CONFIG).is_file():
        import json

        return json.loads((model_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return None


def provenance(dirs: list[Path], out_dir: Path | None = None) -> dict:
    """`{"tasks": [...], "base_model": ...}` of a merge's inputs, for the output's card and `recall.json`."""
    tasks = list(dict.fromkeys(t for d in dirs for t in input_tasks(d)))
    candidates = ([out_dir] if out_dir is not None else []) + list(dirs)
    base = next((b for b in (input_base(d) for d in candidates) if b), None)
    return {"tasks": tasks, "base_model": hub_id_of(base) or base}


def merge_card_info(report, prov: dict) -> CardInfo:
    """Card contents of a `recall_merge` output from its `MergeReport`."""
    labels = [f"{k}: {name}" for k, name in enumerate(input_labels(report.models))]
    what = "LoRA adapters" if report.kind == "adapter" else "models"
    summary = (f"{len(report.models)} {what} merged layer by layer with [RECALL]({PAPER}) (recall-hf "
               f"{report.library_version}); carries {report.output_task_count} task(s). The last input is the "
               "newest task.")
    return CardInfo(title=f"RECALL merge: {', '.join(prov['tasks']) or 'models'}", kind=report.kind,
                    tasks=prov["tasks"], base_model=prov["base_model"], config=report.config,
                    weights=report.weights, labels=labels, summary=summary, task_count=report.output_task_count)


def write_merge_card(stage: Path, report) -> dict:
    """Write the card of a merge output being staged; returns its provenance for `recall.json`."""
    prov = provenance([Path(m) for m in report.models], stage)
    write_card(stage, merge_card_info(report, prov))
    return prov


def write_fold_card(stage: Path, adapter_dir: Path, base: str) -> list[str]:
    """Card of a LoRA adapter folded into full weights (`recall-hf fold`); returns the tasks it carries."""
    prov = provenance([adapter_dir])
    info = CardInfo(title=f"RECALL fold: {', '.join(prov['tasks']) or adapter_dir.name}", kind="full",
                    tasks=prov["tasks"], base_model=hub_id_of(base) or prov["base_model"],
                    summary=f"The LoRA adapter `{adapter_dir.name}` folded into the full weights of its base "
                            f"(PEFT `merge_and_unload`, fp32) by recall-hf; merged with [RECALL]({PAPER}).")
    write_card(stage, info)
    return prov["tasks"]


def publish_task_checkpoint(stage: Path) -> None:
    """Make a task checkpoint copy a publishable model (the first version `fold_into` keeps): its typical samples
    and its fingerprint (token ids of those samples) move to the private folder, and it gets a card."""
    from .privacy import move_private

    move_private(stage, "recall_samples.jsonl")  # samples.SAMPLES_NAME (samples sits above card in the layers)
    move_private(stage, FINGERPRINT_NAME, FINGERPRINTS_DIR)  # `read_fingerprints` finds it there
    meta = read_recall_json(stage)
    prov = provenance([stage])
    kind = "adapter" if (stage / ADAPTER_CONFIG).is_file() else "full"
    write_card(stage, CardInfo(title=f"RECALL task model: {', '.join(prov['tasks']) or stage.name}", kind=kind,
                               tasks=prov["tasks"], base_model=prov["base_model"],
                               summary=f"The first task model of a rolling RECALL merge ({PAPER}), as trained "
                                       f"(recall-hf {meta.get('library_version', '')}).".replace(" ()", "")))
