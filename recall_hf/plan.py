"""The merge plan (SPEC 2.1-2.4): probes, typical samples, representations, similarities, merge coefficients, hashes.

`build_plan` runs every stage up to (not including) fusion over a `MergeStrategy` (full models: `recall_hf.full`;
LoRA adapters: `recall_hf.lora.merge`) and returns a `MergePlan`. Fusion takes the coefficients as an argument
(`recall_hf.merge.execute_merge`), so a later stage can replace the per-layer coefficients of a plan before fusion.

The in-memory entry points, for callers that hold loaded models (benchmarks, notebooks):
`represent(model, tokenizer, texts, config)` and `merge_coefficients(representations, config, task_counts)`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .config import RecallConfig
from .modeldir import input_weight_hashes, task_count
from .representations import pooled_hidden_states
from .samples import SAMPLES_NAME, read_texts
from .similarity import layer_similarities
from .weights import layer_weights


class MergeStrategy(Protocol):
    """What the full-model and the adapter merge each provide to the shared pipeline."""

    kind: str  # "full" or "adapter"
    num_layers: int  # transformer blocks L; representations and coefficients have L + 1 rows
    hashed_dirs: list[Path]  # inputs whose weight files the report hashes
    endpoints: dict | None  # calibrate: D's and N's fingerprint scores when `representations` measured them

    def typical_samples(self, texts: list[str], config: RecallConfig, progress: bool) -> list[str]: ...

    def representations(self, texts: list[str], config: RecallConfig, progress: bool) -> list[torch.Tensor]: ...

    def write(self, stage: Path, coefficients: torch.Tensor, task_counts: list[int], progress: bool) -> dict: ...

    def close(self) -> None: ...


@dataclass
class MergePlan:
    """Everything a merge decided before fusion.

    `coefficients` (`[L+1, K]`, convex per layer) are RECALL's per-layer merge coefficients; `execute_merge` fuses
    with them unless given others (the place a calibrated fold plugs in)."""

    kind: str
    models: list[Path]
    out_dir: Path
    config: RecallConfig
    task_counts: list[int]
    probes: list[str]
    similarities: torch.Tensor
    coefficients: torch.Tensor
    input_hashes: dict[str, dict[str, str]]
    strategy: MergeStrategy
    timings: dict[str, float] = field(default_factory=dict)


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


def parse_task_counts(text: str) -> list[int]:
    """`"1,3"` -> `[1, 3]`; anything but comma-separated positive integers is a one-line `ValueError`."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--task-counts expects comma-separated positive integers, one per model (e.g. 1,3); "
                         f"got {text!r}.")
    return counts


def resolve_task_counts(task_counts: list[int] | None, dirs: list[Path]) -> list[int]:
    """Tasks each model carries: as given, else each directory's `recall.json` (1 for a plain model)."""
    counts = list(task_counts) if task_counts is not None else [task_count(d) for d in dirs]
    if len(counts) != len(dirs):
        raise ValueError(f"Got {len(counts)} task counts for {len(dirs)} models.")
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts):
        raise ValueError(f"Task counts must be non-negative integers, one per model; got {counts}.")
    return counts


def represent(
    model: torch.nn.Module, tokenizer, texts: list[str], config: RecallConfig | None = None, progress: bool = False,
    desc: str = "Representations",
) -> torch.Tensor:
    """A loaded model's mean-pooled hidden states of every layer on `texts`: `[L+1, n, hidden]` fp32 (SPEC 2.2)."""
    config = config or RecallConfig()
    return pooled_hidden_states(model, tokenizer, texts, config.batch_size, config.max_length, progress=progress,
                                desc=desc)


def merge_coefficients(
    representations: list[torch.Tensor], config: RecallConfig | None = None, task_counts: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer similarities `[L+1, K, K]` and merge coefficients `[L+1, K]` from each model's representations of
    the same probes (`represent`), oldest model first (SPEC 2.3-2.4).

    Args:
        representations: `[L+1, n, hidden]` per model.
        config: `similarity`, `tau`, `mode`, `task_count_prior`, `normalize_depth`; defaults to `RecallConfig()`.
        task_counts: tasks each model carries (the count prior); `None` counts 1 each.
    """
    config = config or RecallConfig()
    for k, r in enumerate(representations):
        if not torch.isfinite(r).all():
            raise ValueError(f"Model {k}'s representations hold NaN/Inf values; its weights are corrupt.")
    sims = layer_similarities(representations, config.similarity)
    counts = task_counts if config.task_count_prior else None
    return sims, layer_weights(sims, config.tau, config.mode, counts, config.normalize_depth)


def _timed(timings: dict[str, float], name: str, fn, *args):
    t = time.perf_counter()
    try:
        return fn(*args)
    finally:
        timings[name] = time.perf_counter() - t


def build_plan(
    strategy: MergeStrategy,
    dirs: list[Path],
    probes: str | Path | list[str] | None,
    out_dir: Path,
    config: RecallConfig,
    task_counts: list[int] | None = None,
    progress: bool = True,
    known_hashes: Mapping[str | Path, Mapping[str, str]] | None = None,
) -> MergePlan:
    """Probes -> typical samples -> representations -> similarities and coefficients -> input hashes."""
    timings: dict[str, float] = {}
    counts = resolve_task_counts(task_counts, dirs)
    texts = resolve_probes(probes, dirs[-1])
    if len(texts) > config.k:
        texts = _timed(timings, "select_samples", strategy.typical_samples, texts, config, progress)
    reps = _timed(timings, "representations", strategy.representations, texts, config, progress)
    for d, r in zip(dirs, reps):
        if not torch.isfinite(r).all():
            raise ValueError(f"{d} produces NaN/Inf hidden states on the probes; its weights are corrupt.")
    sims, coefficients = merge_coefficients(reps, config, counts)
    if coefficients.shape[0] != strategy.num_layers + 1:
        raise RuntimeError(f"Got {coefficients.shape[0]} hidden-state layers, expected {strategy.num_layers + 1}.")
    hashes = _timed(timings, "hash_inputs", input_weight_hashes, strategy.hashed_dirs, known_hashes)
    return MergePlan(kind=strategy.kind, models=dirs, out_dir=out_dir, config=config, task_counts=counts,
                     probes=texts, similarities=sims, coefficients=coefficients, input_hashes=hashes,
                     strategy=strategy, timings=timings)
