"""`recall_merge`: RECALL end to end as two stages, `prepare_merge` (the plan) and `execute_merge` (fusion, outputs).

Full models and LoRA adapters are two strategies over one pipeline (`recall_hf.full.FullMerge`,
`recall_hf.lora.merge.AdapterMerge`); this module only picks one and runs the stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .calibrated import carry_fingerprints, check_calibrate, fold_plan, input_fingerprints, report_weights
from .compat import check_distinct_dirs
from .config import RecallConfig
from .durable import check_output_dir, staged_dir
from .hub import resolve_models
from .lineage import checked_base
from .modeldir import is_adapter_dir
from .plan import MergePlan, MergeStrategy, build_plan
from .report import MergeReport, write_outputs

logger = logging.getLogger(__name__)


def check_inputs(dirs: list[Path], out_dir: Path) -> str:
    """At least two existing directories, all full models or all adapters, and a free output; returns the kind."""
    if len(dirs) < 2:
        raise ValueError(f"RECALL merges at least two models, got {len(dirs)}.")
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"Model directory {d} does not exist.")
    check_distinct_dirs(dirs)
    check_output_dir(out_dir)
    adapters = [is_adapter_dir(d) for d in dirs]
    if any(adapters) and not all(adapters):
        raise ValueError("Cannot mix full models and LoRA adapter directories in one merge.")
    return "adapter" if all(adapters) else "full"


def open_strategy(kind: str, dirs: list[Path], base: str | Path | None, config: RecallConfig) -> MergeStrategy:
    """The validated strategy for `kind`: every check on the inputs runs here, before any output."""
    if kind == "adapter":
        from .lora.merge import AdapterMerge

        return AdapterMerge(dirs, base, config)
    from .full import FullMerge

    return FullMerge(dirs, Path(base) if base is not None else None, config)


def prepare_merge(
    models: list[str | Path], probes: str | Path | list[str] | None, out_dir: str | Path,
    config: RecallConfig | None = None, task_counts: list[int] | None = None, base: str | Path | None = None,
    progress: bool = True, known_hashes: Mapping[str | Path, Mapping[str, str]] | None = None,
) -> MergePlan:
    """Validate the inputs and compute everything before fusion (arguments as `recall_merge`); writes nothing."""
    config = config or RecallConfig()
    t0 = time.perf_counter()
    dirs, out_dir = resolve_models(models), Path(out_dir)  # local folders or Hub ids; an output_dir -> its checkpoint
    base = checked_base(base, dirs)  # checked against the parent hashes the inputs recorded
    kind = check_inputs(dirs, out_dir)
    if config.calibrate:
        check_calibrate(kind, dirs)
    strategy = open_strategy(kind, dirs, base, config)
    validate = time.perf_counter() - t0
    try:
        plan = build_plan(strategy, dirs, probes, out_dir, config, task_counts, progress, known_hashes)
    except BaseException:
        strategy.close()
        raise
    plan.timings = {"validate": validate, **plan.timings}
    return plan


def check_coefficients(plan: MergePlan, coefficients: torch.Tensor) -> torch.Tensor:
    """Replacement coefficients must have the plan's shape and be finite."""
    coefficients = torch.as_tensor(coefficients, dtype=plan.coefficients.dtype)
    if coefficients.shape != plan.coefficients.shape:
        raise ValueError(f"Coefficients of shape {tuple(coefficients.shape)} do not fit the plan's "
                         f"{tuple(plan.coefficients.shape)} (layers + 1, models).")
    if not torch.isfinite(coefficients).all():
        raise ValueError("The merge coefficients hold NaN/Inf values.")
    return coefficients


def _calibrate(plan: MergePlan, report: MergeReport):
    """Run the calibrated fold (SPEC 2.7) into `report`; returns `(fold, fingerprints)` for `_fuse`."""
    t = time.perf_counter()
    fingerprints = input_fingerprints(plan)
    fold = fold_plan(plan, fingerprints)
    report.weights = report_weights(fold, len(plan.models))
    report.calibration = {**fold.report, "tasks": sorted(fingerprints)}
    report.timings = {**plan.timings, "calibrate": time.perf_counter() - t}
    return fold, fingerprints


def _fuse(plan: MergePlan, stage: Path, coefficients: torch.Tensor, calibrated, progress: bool) -> dict:
    """Fuse into `stage`: the plan's rule with `coefficients`, or the calibrated fold with its fingerprints."""
    if calibrated is None:
        return plan.strategy.write(stage, coefficients, plan.task_counts, progress)
    fold, fingerprints = calibrated
    stats = plan.strategy.write_fused(stage, fold.inputs, fold.weights, progress)
    stats.update(fusion_inputs=[str(p) for p in fold.inputs], fusion_weights=fold.weights.tolist(),
                 planned_weights=plan.coefficients.tolist(), fingerprints=carry_fingerprints(stage, fingerprints))
    return stats


def execute_merge(plan: MergePlan, coefficients: torch.Tensor | None = None, progress: bool = True) -> MergeReport:
    """Fuse the plan's models with per-layer `coefficients` (default: the plan's) and write the output atomically.

    With `config.calibrate` the calibrated fold chooses the fusion weights instead (no `coefficients` then); the
    report's `calibration` lists its candidates and the output carries every input's fingerprints.

    Returns:
        The `MergeReport`; `weights` are the coefficients used (the plan's are kept in `stats["planned_weights"]`
        when others were given).
    """
    t0 = time.perf_counter()
    planned = coefficients is None
    if plan.config.calibrate and not planned:
        raise ValueError("Pass either coefficients or calibrate=True, not both.")
    coefficients = plan.coefficients if planned else check_coefficients(plan, coefficients)
    report = MergeReport(
        out_dir=str(plan.out_dir), kind=plan.kind, models=[str(d) for d in plan.models], task_counts=plan.task_counts,
        output_task_count=sum(plan.task_counts), config=plan.config.to_dict(), probes=plan.probes,
        similarities=plan.similarities.tolist(), weights=coefficients.tolist(), input_hashes=plan.input_hashes,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), timings=dict(plan.timings),
    )
    try:
        calibrated = _calibrate(plan, report) if plan.config.calibrate else None
        t_fuse = time.perf_counter()
        with staged_dir(plan.out_dir) as stage:
            report.stats = _fuse(plan, stage, coefficients, calibrated, progress)
            if not planned:
                report.stats["planned_weights"] = plan.coefficients.tolist()
            report.timings["fusion"] = time.perf_counter() - (t0 if calibrated is None else t_fuse)
            report.timings["total"] = sum(report.timings.values())
            write_outputs(stage, report)
    finally:
        plan.strategy.close()
    logger.info("RECALL merge of %d %s written to %s (%.1fs)", len(plan.models),
                "LoRA adapters" if plan.kind == "adapter" else "models", plan.out_dir, report.timings["total"])
    return report


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
    plan = prepare_merge(models, probes, out_dir, config, task_counts, base, progress, known_hashes)
    return execute_merge(plan, progress=progress)
