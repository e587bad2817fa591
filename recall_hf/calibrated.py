"""The calibrated fold inside a merge (SPEC 2.7): the checks, the fold between plan and fusion, what the output keeps.

`recall_hf.merge` calls these when `RecallConfig.calibrate` is on: `check_calibrate` before any work,
`fold_plan` between the plan and fusion (D = the deployed model, the second-to-last input; N = the newest; P = the
`--base` model in the from-base form, else D; LoRA adapters fold on their base, `lora.calibrate`), and
`carry_fingerprints` into the staged output, so the next merge scores its candidates against every task folded so far.
The fingerprints hold the typical samples' token ids: the output's `_recall_private/fingerprints/` is private to the
deployment, like `recall_samples.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

from .calibrate import CalibratedFold, CalibrationConfig, calibrated_fold
from .fingerprint import FINGERPRINT_NAME, Fingerprint, collect_fingerprints, load_fingerprint, write_fingerprints
from .plan import MergePlan


def check_calibrate(kind: str, dirs: list[Path]) -> None:
    """`calibrate=True` needs exactly two models or adapters (the deployed and the new) and the new one's fingerprint;
    each refusal is one line saying what to do (adapters: `lora.calibrate.check_calibrate_adapters` too)."""
    if len(dirs) != 2:
        raise ValueError(f"calibrate folds one new model into the deployed one: pass exactly 2 models (the deployed "
                         f"one, then the new one; the base goes in --base), got {len(dirs)}.")
    if not (dirs[-1] / FINGERPRINT_NAME).is_file():
        raise ValueError(f"The newest model {dirs[-1]} has no {FINGERPRINT_NAME}; run `recall-hf task-checkpoint "
                         f"{dirs[-1]} --texts TEXTS.jsonl` first (or merge with --no-calibrate).")


def input_fingerprints(plan: MergePlan) -> dict[str, Fingerprint]:
    """The union of every input's fingerprints (base, deployed, new; a later folder wins a task's name)."""
    return collect_fingerprints(*plan.strategy.hashed_dirs)


def fold_plan(plan: MergePlan, fingerprints: dict[str, Fingerprint]) -> CalibratedFold:
    """Search the fold of the newest model into the deployed one, RECALL's newest-model weights as the profile
    (adapters: the strategy's own `calibrated_fold` on the bare base)."""
    new_task = load_fingerprint(plan.models[-1] / FINGERPRINT_NAME).task
    config = CalibrationConfig(batch_size=plan.config.batch_size, device=plan.config.device,
                               screen_samples=plan.config.calibrate_screen, rule=plan.config.calibrate_rule)
    if plan.kind == "adapter":
        return plan.strategy.calibrated_fold(fingerprints, new_task, plan.coefficients[:, -1], config)
    base = getattr(plan.strategy, "base", None)
    return calibrated_fold(plan.models[-2], plan.models[-1], fingerprints, new_task, parent=base,
                           profile=plan.coefficients[:, -1], config=config, endpoints=plan.strategy.endpoints)


def report_weights(fold: CalibratedFold, n_models: int) -> list[list[float]]:
    """The chosen fold's weights over the merge's models (the base's `-a_l` of the from-base form is left to
    `stats["fusion_weights"]`)."""
    return fold.weights[:, -n_models:].tolist()


def carry_fingerprints(stage: Path, fingerprints: dict[str, Fingerprint]) -> list[str]:
    """Write every folded task's fingerprint into the output; the task names written."""
    write_fingerprints(stage, fingerprints)
    return sorted(fingerprints)
