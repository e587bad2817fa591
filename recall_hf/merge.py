"""`recall_merge`: the RECALL pipeline end to end, with its report and plot (SPEC 2)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from . import __version__
from .card import write_merge_card
from .checkpoint import (
    PLOT_NAME,
    RECALL_JSON,
    REPORT_NAME,
    check_output_dir,
    copy_aux_files,
    input_weight_hashes,
    is_adapter_dir,
    staged_dir,
    task_count,
    weight_hashes,
    write_json,
)
from .config import RecallConfig
from .fusion import check_compatible, fuse_checkpoints
from .hub import input_labels, resolve_models
from .layers import LayerMap, num_hidden_layers
from .lineage import resolve_base
from .privacy import publishable_report
from .representations import load_tokenizer, model_representations
from .safetensors_io import CheckpointReader
from .samples import SAMPLES_NAME, read_texts, select_typical_samples
from .similarity import layer_similarities
from .weights import layer_weights, task_vector_coefficients

logger = logging.getLogger(__name__)


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
    weights: list[list[float]]
    input_hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    library_version: str = __version__
    created: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def newest_weight(self) -> list[float]:
        """The newest model's weight per layer (0..L)."""
        return [row[-1] for row in self.weights]


def load_config(model_dir: Path) -> transformers.PretrainedConfig:
    try:
        return transformers.AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"Cannot read config.json of {model_dir}: {reason}") from None


def check_same_architecture(configs: list[transformers.PretrainedConfig], dirs: list[Path]) -> None:
    ref, ref_dir = configs[-1], dirs[-1]
    for cfg, d in zip(configs[:-1], dirs[:-1]):
        for key in ("model_type", "hidden_size", "vocab_size"):
            a, b = getattr(cfg, key, None), getattr(ref, key, None)
            if a != b:
                raise ValueError(
                    f"{d} has {key}={a!r} but {ref_dir} has {b!r}; merge only models of one architecture."
                )
        if num_hidden_layers(cfg) != num_hidden_layers(ref):
            raise ValueError(f"{d} has {num_hidden_layers(cfg)} layers but {ref_dir} has {num_hidden_layers(ref)}.")


def resolve_probes(probes: str | Path | list[str] | None, newest: Path) -> list[str]:
    """Probe texts: a list, a `.jsonl`/`.txt` file, or the newest model's `recall_samples.jsonl`."""
    if probes is None:
        path = newest / SAMPLES_NAME
        if not path.exists():
            raise ValueError(
                f"No probes given and {path} does not exist; pass --probes FILE.jsonl "
                '(one {"text": ...} per line) or run `recall-hf select-samples` first.'
            )
        return read_texts(path)
    if isinstance(probes, (str, Path)):
        return read_texts(probes)
    texts = [t for t in probes if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("The probe list holds no non-empty texts.")
    return texts


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


def compute_weights(
    reps: list[torch.Tensor], config: RecallConfig, task_counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities `[L+1, K, K]` and weights `[L+1, K]` from per-model representations."""
    sims = layer_similarities(reps, config.similarity)
    counts = task_counts if config.task_count_prior else None
    return sims, layer_weights(sims, config.tau, config.mode, counts, config.normalize_depth)


def recall_merge(
    models: list[str | Path],
    probes: str | Path | list[str] | None,
    out_dir: str | Path,
    config: RecallConfig | None = None,
    task_counts: list[int] | None = None,
    base: str | Path | None = None,
    progress: bool = True,
    known_hashes: Mapping[str | Path, Mapping[str, str]] | None = None,
) -> MergeReport:
    """Merge models (or LoRA adapters) with RECALL and write the result to `out_dir`.

    Args:
        models: model directories, oldest first; in `continual` mode the last one is the newest task model.
        probes: probe texts (list or `.jsonl`/`.txt` path); `None` reads the newest model's
            `recall_samples.jsonl`. More than `config.k` texts are first reduced to typical samples.
        out_dir: where the merged model goes; must not exist (or be empty). Written atomically.
        config: RECALL settings; defaults to `RecallConfig()`.
        task_counts: tasks each model carries, overriding their `recall.json` (`task_count`, default 1).
        base: the common base model: for adapter merges (default: `base_model_name_or_path` of the adapters) and
            for `fusion="task_vector"` of full models.
        progress: show progress bars.
        known_hashes: sha256 of weight files the caller already computed, `{directory: {file name: sha256}}`; the
            report records them instead of hashing those inputs again (the daemon passes its verified drop hashes).

    Returns:
        The `MergeReport`, also saved as `recall_report.json` with a plot `recall_weights.png`.
    """
    config = config or RecallConfig()
    out_dir = Path(out_dir)
    if len(models) < 2:
        raise ValueError(f"RECALL merges at least two models, got {len(models)}.")
    dirs = resolve_models(models)  # local folders or Hub ids; a trainer's output_dir points to its checkpoint
    base = resolve_base(base, dirs)  # checked against the parent hashes the inputs recorded
    check_output_dir(out_dir)
    adapters = [is_adapter_dir(d) for d in dirs]
    if any(adapters):
        if not all(adapters):
            raise ValueError("Cannot mix full models and LoRA adapter directories in one merge.")
        from .adapters import recall_merge_adapters

        return recall_merge_adapters(dirs, probes, out_dir, config, task_counts, base, progress, known_hashes)
    task_vector = config.fusion == "task_vector"
    if base is not None and not task_vector:
        raise ValueError(
            "--base is for adapter merges and --fusion task_vector; with convex fusion of full models "
            "list the base among the models."
        )
    if task_vector and base is None:
        raise ValueError(
            "Fusion task_vector needs the common base model the task models were fine-tuned from: "
            "pass base=DIR (--base DIR)."
        )
    base_dir = Path(base) if base is not None else None
    if base_dir is not None and not base_dir.is_dir():
        raise ValueError(f"Base model directory {base_dir} does not exist.")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # Validate everything before the first byte of output.
    configs = [load_config(d) for d in dirs]
    check_same_architecture(configs, dirs)
    readers = [CheckpointReader(d) for d in dirs]
    if base_dir is not None:
        check_same_architecture([load_config(base_dir), configs[-1]], [base_dir, dirs[-1]])
        readers.insert(0, CheckpointReader(base_dir))
    check_compatible(readers)
    layer_map = LayerMap.from_config(configs[-1])
    for name in readers[-1].tensors:
        layer_map.layer_of(name)
    tokenizer = load_tokenizer(dirs[-1])
    counts = list(task_counts) if task_counts is not None else [task_count(d) for d in dirs]
    if len(counts) != len(dirs):
        raise ValueError(f"Got {len(counts)} task counts for {len(dirs)} models.")
    texts = resolve_probes(probes, dirs[-1])
    timings["validate"] = time.perf_counter() - t0

    t = time.perf_counter()
    if len(texts) > config.k:
        texts = [s["text"] for s in select_typical_samples(texts, dirs[-1], tokenizer, config, progress)]
    timings["select_samples"] = time.perf_counter() - t

    t = time.perf_counter()
    reps = [
        model_representations(
            d, texts, tokenizer, config.batch_size, config.max_length, config.device, config.device_map, progress,
            desc=f"Representations {label}",
        )
        for d, label in zip(dirs, input_labels(dirs))  # distinct even when two inputs share a folder name
    ]
    timings["representations"] = time.perf_counter() - t
    for d, r in zip(dirs, reps):
        if not torch.isfinite(r).all():
            raise ValueError(f"{d} produces NaN/Inf hidden states on the probes; its weights are corrupt.")
    sims, weights = compute_weights(reps, config, counts)
    if weights.shape[0] != layer_map.num_layers + 1:
        raise RuntimeError(f"Got {weights.shape[0]} hidden-state layers, expected {layer_map.num_layers + 1}.")

    fusion_weights = weights
    if task_vector:
        coefficients = task_vector_coefficients(weights, counts)
        # theta = (1 - sum_k c_k) theta_base + sum_k c_k theta_k: the base enters as an extra model.
        fusion_weights = torch.cat([1.0 - coefficients.sum(-1, keepdim=True), coefficients], dim=-1)

    t = time.perf_counter()
    hashes = input_weight_hashes(([base_dir] if base_dir else []) + dirs, known_hashes)
    timings["hash_inputs"] = time.perf_counter() - t

    report = MergeReport(
        out_dir=str(out_dir),
        kind="full",
        models=[str(d) for d in dirs],
        task_counts=counts,
        output_task_count=sum(counts),
        config=config.to_dict(),
        probes=texts,
        similarities=sims.tolist(),
        weights=weights.tolist(),
        input_hashes=hashes,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    with staged_dir(out_dir) as stage:
        t = time.perf_counter()
        report.stats = fuse_checkpoints(
            readers, layer_map, fusion_weights.float(), stage, config.dtype, config.max_shard_size, progress
        )
        if task_vector:
            report.stats["base"] = str(base_dir)
            report.stats["task_vector_coefficients"] = coefficients.tolist()
        timings["fusion"] = time.perf_counter() - t
        copy_aux_files(dirs[-1], stage)
        if config.dtype:
            cfg_path = stage / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["dtype"] = config.dtype
            cfg.pop("torch_dtype", None)
            cfg_path.write_text(json.dumps(cfg, indent=2))
        timings["total"] = time.perf_counter() - t0
        report.timings = timings
        write_outputs(stage, report)
    logger.info("RECALL merge of %d models written to %s (%.1fs)", len(dirs), out_dir, timings["total"])
    return report


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
