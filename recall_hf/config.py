"""RecallConfig: every RECALL knob in one place (SPEC 2)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODES = ("continual", "multi")
FUSIONS = ("convex", "task_vector")
CALIBRATE_RULES = ("minimax", "mean")  # recall_hf.calibrate.CalibrationConfig.rule
DTYPES = ("float32", "bfloat16", "float16")


def dataclass_from_dict(cls, data: dict[str, Any], what: str):
    """Build dataclass `cls` from `data`, refusing unknown keys with a message that lists the valid ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; valid {what}: {', '.join(sorted(known))}.")
    return cls(**data)


def check_finite(obj) -> None:
    """Every float field of dataclass `obj` is finite: NaN or Inf in a setting is refused with the field's name."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(obj).__name__}.{f.name} must be a finite number, got {value}.")


@dataclass
class RecallConfig:
    """Configuration of a RECALL merge ([arXiv 2510.20479](https://arxiv.org/abs/2510.20479)).

    Args:
        k (`int`, *optional*, defaults to `32`):
            Number of typical samples (KMeans clusters) picked from a task's texts.
        max_candidates (`int`, *optional*, defaults to `2000`):
            Texts embedded for clustering at most; larger sets are subsampled with `seed`.
        minibatch_threshold (`int`, *optional*, defaults to `5000`):
            Use `MiniBatchKMeans` instead of `KMeans` from this many candidates on.
        seed (`int`, *optional*, defaults to `0`):
            Seed for candidate subsampling and clustering.
        similarity (`str`, *optional*, defaults to `"rbf"`):
            Per-layer similarity kernel: `rbf`, `linear_cka`, `rbf_cka` or `cosine`.
        tau (`float`, *optional*, defaults to `0.5`):
            Softmax temperature turning per-layer scores into merge weights.
        mode (`str`, *optional*, defaults to `"continual"`):
            `continual`: the target is the newest (last) model; `multi`: uniform target over all models.
        task_count_prior (`bool`, *optional*, defaults to `True`):
            Add `log m_k` (tasks model k carries) to the softmax logits so old tasks keep their share.
        fusion (`str`, *optional*, defaults to `"convex"`):
            `convex`: `sum_k w_k theta_k` (the paper; right when each task was fine-tuned from the deployed model).
            `task_vector`: `theta_base + sum_k c_k (theta_k - theta_base)` with `c = (w/m) / max(w/m)` per layer;
            needs the common base model, for task models each fine-tuned from that base.
        calibrate (`bool`, *optional*, defaults to `False`):
            Calibrated fold (SPEC 2.7, two models or two LoRA adapters): search candidate folds of the newest model
            into the deployed one and keep the one closest to every folded task's fingerprint; the output carries
            every task's fingerprint. Needs `recall-hf task-checkpoint` on the new model. `False`: the paper's rule.
        calibrate_screen (`int`, *optional*, defaults to `0`):
            With `calibrate`: score every candidate on this many samples per task, then only the best 2 on all of
            them (`CalibrationConfig.screen_samples`); cheaper, and may choose differently. 0: the full search.
        calibrate_rule (`str`, *optional*, defaults to `"minimax"`):
            With `calibrate`: how candidates are compared across tasks (`CalibrationConfig.rule`). `minimax`: the
            fold where the worst-off task has lost the smallest share of its own model's knowledge beyond its
            better endpoint; `mean`: the mean of every task's divergence over its information scale.
        fingerprint_steps (`int`, *optional*, defaults to `4`):
            Causal LMs: positions per typical sample a task checkpoint's fingerprint keeps, the prompt's end and the
            first `fingerprint_steps - 1` greedy tokens. Match it to the answers the task trains: a position the
            loss never trained (after a one-word label) drifts freely and misleads the calibrated fold (SmolLM2
            label-word chain: 1 beat 4 by 1.4-2.6 ACC points in each of 3 seeds; from one base it did no better,
            README).
        normalize_depth (`bool`, *optional*, defaults to `False`):
            Rescale each layer's divergence by its spread across layers before the softmax.
        batch_size (`int`, *optional*, defaults to `8`):
            Batch size of the forward passes.
        max_length (`int`, *optional*, defaults to `256`):
            Token limit per probe text.
        dtype (`str`, *optional*, defaults to `None`):
            Output dtype (`float32`, `bfloat16`, `float16`); `None` keeps each tensor's stored dtype.
        max_shard_size (`int`, *optional*, defaults to `5_000_000_000`):
            Largest output safetensors shard in bytes.
        max_rank (`int`, *optional*, defaults to `None`):
            LoRA merges only: compress the stacked factors to this rank by truncated SVD.
        device (`str`, *optional*, defaults to `"cpu"`):
            Device for the forward passes (fusion always streams on the CPU).
        device_map (`str`, *optional*, defaults to `None`):
            accelerate `device_map` (e.g. `"auto"`) for models larger than one device.
    """

    k: int = field(
        default=32, metadata={"help": "Number of typical samples (KMeans clusters) per task.", "aliases": ("-k",)}
    )
    max_candidates: int = field(
        default=2000, metadata={"help": "Most texts embedded for clustering (seeded subsample)."}
    )
    minibatch_threshold: int = field(
        default=5000, metadata={"help": "Use MiniBatchKMeans from this many candidates on."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for subsampling and clustering."})
    similarity: str = field(
        default="rbf", metadata={"help": "Per-layer similarity: rbf, linear_cka, rbf_cka, cosine."}
    )
    tau: float = field(default=0.5, metadata={"help": "Softmax temperature of the per-layer merge weights."})
    mode: str = field(
        default="continual",
        metadata={"help": "continual (target = newest, last model) or multi (uniform target).", "choices": MODES},
    )
    task_count_prior: bool = field(default=True, metadata={"help": "Add log(task count) of each model to the logits."})
    fusion: str = field(
        default="convex",
        metadata={
            "help": "convex (sum w_k theta_k, the paper) or task_vector (base + sum c_k task vectors, for task models "
            "each fine-tuned from one base; needs --base for full models).",
            "choices": FUSIONS,
        },
    )
    calibrate: bool = field(
        default=False,
        metadata={"help": "Calibrated fold: pick the fold closest to every task's fingerprint (2 models or 2 LoRA "
                  "adapters; --base DIR for the from-base form). The output keeps every task's fingerprint."},
    )
    calibrate_screen: int = field(
        default=0,
        metadata={"help": "Calibrated fold, cheaper search that may choose differently: score candidates on this many "
                  "samples per task, then the best 2 on all (0: every candidate on all samples)."},
    )
    calibrate_rule: str = field(
        default="minimax",
        metadata={"help": "Calibrated fold's comparison across tasks: minimax (the worst-off task's share of its "
                  "knowledge lost) or mean (every task's share, averaged).", "choices": CALIBRATE_RULES},
    )
    fingerprint_steps: int = field(
        default=4,
        metadata={"help": "Causal LMs: positions per typical sample the task fingerprint keeps, the prompt's end and "
                  "the greedy tokens after it; match the answer length the task trains (1 for single word labels)."},
    )
    normalize_depth: bool = field(default=False, metadata={"help": "Rescale layer divergences by their spread."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the forward passes."})
    max_length: int = field(default=256, metadata={"help": "Token limit per probe text."})
    dtype: str | None = field(
        default=None, metadata={"help": "Output dtype (default: keep the stored dtype).", "choices": DTYPES}
    )
    max_shard_size: int = field(default=5_000_000_000, metadata={"help": "Largest output shard in bytes."})
    max_rank: int | None = field(default=None, metadata={"help": "LoRA only: compress merged factors to this rank."})
    device: str = field(default="cpu", metadata={"help": "Device for the forward passes."})
    device_map: str | None = field(default=None, metadata={"help": "accelerate device_map for very large models."})

    def __post_init__(self) -> None:
        from .similarity import SIMILARITIES

        if self.k < 1:
            raise ValueError(f"RecallConfig.k must be >= 1, got {self.k}.")
        if self.max_candidates < self.k:
            raise ValueError(f"RecallConfig.max_candidates ({self.max_candidates}) must be >= k ({self.k}).")
        check_finite(self)
        if not self.tau > 0:
            raise ValueError(f"RecallConfig.tau must be > 0, got {self.tau}.")
        if self.mode not in MODES:
            raise ValueError(f"RecallConfig.mode must be one of {', '.join(MODES)}; got {self.mode!r}.")
        if self.fusion not in FUSIONS:
            raise ValueError(f"RecallConfig.fusion must be one of {', '.join(FUSIONS)}; got {self.fusion!r}.")
        if self.similarity not in SIMILARITIES:
            raise ValueError(
                f"Unknown similarity {self.similarity!r}; choose one of: {', '.join(sorted(SIMILARITIES))}."
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"RecallConfig.dtype must be float32, bfloat16, float16 or None; got {self.dtype!r}.")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"RecallConfig.max_rank must be >= 1 or None, got {self.max_rank}.")
        if self.calibrate_rule not in CALIBRATE_RULES:
            raise ValueError(f"RecallConfig.calibrate_rule must be one of {', '.join(CALIBRATE_RULES)}; got "
                             f"{self.calibrate_rule!r}.")
        if self.calibrate_screen < 0:
            raise ValueError(f"RecallConfig.calibrate_screen must be >= 0, got {self.calibrate_screen}.")
        if self.fingerprint_steps < 1:
            raise ValueError(f"RecallConfig.fingerprint_steps must be >= 1, got {self.fingerprint_steps}.")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("RecallConfig.batch_size and max_length must be >= 1.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecallConfig:
        return dataclass_from_dict(cls, data, "RecallConfig fields")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
