"""Per-layer merge weights from per-layer similarities (SPEC 2.4)."""

from __future__ import annotations

import torch


def target_distribution(n_models: int, mode: str) -> torch.Tensor:
    """`pi`: one-hot on the newest (last) model in `continual` mode, uniform in `multi` mode."""
    if n_models < 2:
        raise ValueError(f"Need at least two models to merge, got {n_models}.")
    if mode == "continual":
        pi = torch.zeros(n_models, dtype=torch.float64)
        pi[-1] = 1.0
        return pi
    if mode == "multi":
        return torch.full((n_models,), 1.0 / n_models, dtype=torch.float64)
    raise ValueError(f"Unknown mode {mode!r}; choose continual or multi.")


def normalize_depth_profile(scores: torch.Tensor) -> torch.Tensor:
    """Min-max rescale each model's divergence `1 - score` across layers so its depth profile spans [0, 1].

    The layer where a model agrees most with the target gets score 1 (an even share), the layer where it
    diverges most gets score 0; models that never diverge keep score 1.
    """
    div = 1.0 - scores
    lo = div.min(dim=0, keepdim=True).values
    span = div.max(dim=0, keepdim=True).values - lo
    scaled = torch.where(span > 1e-12, (div - lo) / span.clamp_min(1e-12), torch.zeros_like(div))
    return 1.0 - scaled


def layer_weights(
    sims: torch.Tensor,
    tau: float,
    mode: str = "continual",
    task_counts: list[float] | None = None,
    normalize_depth: bool = False,
) -> torch.Tensor:
    """RECALL weights `w_l = softmax_k(score_l / tau + log m_k)` with `score_l(k) = sum_j pi_j s_l(k, j)`.

    Args:
        sims: `[L+1, K, K]` per-layer similarities.
        tau: softmax temperature (> 0).
        mode: `continual` (target = newest model) or `multi` (uniform target).
        task_counts: tasks each model carries (the count prior); `None` means all 1. A model with count 0 gets
            weight 0 (unless every count is 0).
        normalize_depth: rescale each model's divergence over depth before the softmax.

    Returns:
        `[L+1, K]` float64 weights, each row convex (non-negative, sums to 1).
    """
    if sims.ndim != 3 or sims.shape[1] != sims.shape[2]:
        raise ValueError(f"sims must have shape [L+1, K, K], got {tuple(sims.shape)}.")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}.")
    n_models = sims.shape[1]
    pi = target_distribution(n_models, mode)
    scores = sims.double() @ pi
    if normalize_depth:
        scores = normalize_depth_profile(scores)
    logits = scores / tau
    if task_counts is not None:
        if len(task_counts) != n_models:
            raise ValueError(f"Got {len(task_counts)} task counts for {n_models} models.")
        counts = torch.tensor([float(c) for c in task_counts], dtype=torch.float64)
        if (counts < 0).any():
            raise ValueError(f"task_counts must be >= 0, got {task_counts}.")
        if (counts > 0).any():
            # A model that carries no task yet (the daemon's base v0000) gets weight 0: log 0 = -inf.
            logits = logits + torch.log(counts)
    return torch.softmax(logits, dim=-1)


def task_vector_coefficients(weights: torch.Tensor, task_counts: list[float] | None = None) -> torch.Tensor:
    """Turn convex RECALL weights `[L+1, K]` into per-layer task-vector coefficients (fusion `task_vector`).

    Each model's per-task share is `w_k / m_k` (`m_k` = tasks it carries, at least 1); dividing by the largest
    share gives coefficients in (0, 1]: the model a layer trusts most keeps its whole task vector and the others
    keep their relative share. Where the models agree this is task arithmetic with lambda 1 over every task; where
    they diverge the less trusted update shrinks. Convex weights instead dilute every task vector by the step count,
    which is only right when the models were fine-tuned one from another (the chain protocol).

    The merged parameter is `theta_base + sum_k c_k (theta_k - theta_base)`.
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must have shape [L+1, K], got {tuple(weights.shape)}.")
    n_models = weights.shape[-1]
    counts = task_counts if task_counts is not None else [1.0] * n_models
    if len(counts) != n_models:
        raise ValueError(f"Got {len(counts)} task counts for {n_models} models.")
    share = weights / torch.tensor([max(1.0, float(c)) for c in counts], dtype=weights.dtype)
    return share / share.max(dim=-1, keepdim=True).values.clamp_min(1e-12)
