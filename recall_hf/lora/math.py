"""LoRA merge math (SPEC 2.5), pure functions on factors: scale, stack, compress, one module's merge.

For an adapted module, adapter k adds `dW_k = s_k * B_k @ A_k` (`s_k = alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
Merging the full models `W + dW_k` with convex per-layer weights `w_k` gives `W + sum_k w_k dW_k`, and that sum is
exactly `B @ A` with `A = [A_1; A_2; ...]` and `B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]`: a LoRA of rank `r_1 + r_2 + ...`
and scale 1. `compress_lora` optionally brings it down to a target rank by a truncated SVD computed on the small
factors. Anything PEFT can express that this identity does not cover (DoRA, LoRA biases, base-modifying
initialisations, ...) is refused before any output is written, never merged approximately.
"""

from __future__ import annotations

import math

import torch


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The scale PEFT multiplies `B @ A` by: `alpha / r`, or `alpha / sqrt(r)` for rsLoRA (arXiv 2312.03732)."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got r={r!r}.")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"LoRA alpha must be a finite number, got lora_alpha={alpha!r}.")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def stack_lora(
    As: list[torch.Tensor], Bs: list[torch.Tensor], scales: list[float], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack LoRA factors so that `B @ A == sum_k weights[k] * scales[k] * Bs[k] @ As[k]` exactly (fp32).

    Args:
        As: `[r_k, in]` factors, one per adapter (ranks may differ).
        Bs: `[out, r_k]` factors, matching `As`.
        scales: each adapter's LoRA scale `s_k` for this module.
        weights: each adapter's merge weight `w_k` for this module's layer.

    Returns:
        `(A, B)`: fp32 `[sum r_k, in]` and `[out, sum r_k]`, to be used with scale 1.
    """
    n = len(As)
    if n == 0 or not (len(Bs) == len(scales) == len(weights) == n):
        raise ValueError(f"stack_lora needs equally many A, B, scales and weights (>= 1), got "
                         f"{len(As)}, {len(Bs)}, {len(scales)}, {len(weights)}.")
    in_dim, out_dim = As[0].shape[-1], Bs[0].shape[0]
    for k, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"Adapter {k}: A {tuple(a.shape)} and B {tuple(b.shape)} are not [r, in] and [out, r].")
        if a.shape[1] != in_dim or b.shape[0] != out_dim:
            raise ValueError(f"Adapter {k}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match the first adapter's "
                             f"in={in_dim}, out={out_dim}.")
    A = torch.cat([a.to(torch.float32) for a in As], dim=0)
    B = torch.cat([b.to(torch.float32) * (float(w) * float(s)) for b, s, w in zip(Bs, scales, weights)], dim=1)
    return A, B


def compress_lora(A: torch.Tensor, B: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`max_rank` approximation of `B @ A`, computed on the factors (QR of `B` and `A^T`, SVD of the core).

    `B @ A = Qb Rb Ra^T Qa^T`, so the SVD of the small core `Rb Ra^T` gives the SVD of the product without forming
    it (Eckart-Young: truncating it is optimal in Frobenius norm). The kept singular values are split evenly between
    the two factors.

    Returns:
        `(A', B', rel_error)` in the input dtype, with `rel_error = ||B A - B' A'||_F / ||B A||_F`; the inputs and
        `0.0` when their rank is already `<= max_rank`.
    """
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}.")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, in] and [out, r].")
    if A.shape[0] <= max_rank:
        return A, B, 0.0
    qb, rb = torch.linalg.qr(B.to(torch.float64))
    qa, ra = torch.linalg.qr(A.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(max_rank, s.numel())
    total = s.pow(2).sum()
    rel_error = float((s[k:].pow(2).sum() / total).sqrt()) if total > 0 else 0.0
    root = s[:k].sqrt()
    B_new = (qb @ u[:, :k]) * root
    A_new = root[:, None] * (vh[:k] @ qa.T)
    return A_new.to(A.dtype), B_new.to(B.dtype), rel_error


def as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View factors of any LoRA layer (Linear, Embedding, Conv) as `[r, in]` and `[out, r]` matrices."""
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])


def contributing(
    mats: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float], weights: list[float]
) -> list[int]:
    """Indices of the factors that add something: coefficient `w * s != 0` and `B` not all zeros. The others (a
    fresh zero adapter, a task at weight 0) would only grow the stacked rank with zero columns."""
    return [k for k, ((_, b), s, w) in enumerate(zip(mats, scales, weights))
            if float(w) * float(s) != 0.0 and bool(b.ne(0).any())]


def merge_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]], scales: list[float], weights: list[float], max_rank: int | None,
    name: str = "module",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module's merged factors: `sum_k weights[k] * scales[k] * B_k @ A_k` stacked, optionally compressed.

    Args:
        factors: `(A_k, B_k)` of every adapter that adapts the module, in any LoRA layer's shape (Linear, Embedding,
            Conv); all must share the first one's shapes apart from the rank.
        scales: each adapter's LoRA scale for this module.
        weights: each adapter's merge coefficient for this module's layer.
        max_rank: compress to this rank by truncated SVD (`None`: keep the exact stacked rank).
        name: the module's name, used in errors.

    Returns:
        `(A, B, rel_error)` fp32, shaped like the first adapter's factors with the merged rank.
    """
    a_shape, b_shape = factors[0][0].shape, factors[0][1].shape
    mats = [as_matrices(a, b) for a, b in factors]
    keep = contributing(mats, scales, weights)
    if not keep:  # nothing adds anything: one zero factor (PEFT needs rank >= 1)
        mats, scales, weights, keep = [(mats[0][0][:1], mats[0][1][:, :1])], [0.0], [0.0], [0]
    A, B = stack_lora([mats[k][0] for k in keep], [mats[k][1] for k in keep], [scales[k] for k in keep],
                      [weights[k] for k in keep])
    rel_error = 0.0
    if max_rank is not None:
        A, B, rel_error = compress_lora(A, B, max_rank)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError(f"Merged factors of {name!r} have NaN/Inf values; check the input adapters.")
    rank = A.shape[0]
    return A.reshape(rank, *a_shape[1:]), B.reshape(b_shape[0], rank, *b_shape[2:]), rel_error
