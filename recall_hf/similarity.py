"""Per-layer similarity between models' representations (SPEC 2.3), selectable by name.

Every kernel takes two representation matrices `x, y` of shape `[n_samples, hidden]` (the same probes through two
models at one layer) plus a bandwidth where it needs one, and returns a similarity in [0, 1] with `sim(x, x) = 1`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SimilarityFn = Callable[[torch.Tensor, torch.Tensor, float], float]
SIMILARITIES: dict[str, SimilarityFn] = {}


def register_similarity(name: str) -> Callable[[SimilarityFn], SimilarityFn]:
    """Register a similarity kernel under `name` (refuses duplicates)."""

    def wrap(fn: SimilarityFn) -> SimilarityFn:
        if name in SIMILARITIES:
            raise ValueError(f"Similarity {name!r} is already registered.")
        SIMILARITIES[name] = fn
        return fn

    return wrap


def get_similarity(name: str) -> SimilarityFn:
    """Look a kernel up by name; an unknown name raises an error listing the valid ones."""
    if name not in SIMILARITIES:
        raise ValueError(f"Unknown similarity {name!r}; choose one of: {', '.join(sorted(SIMILARITIES))}.")
    return SIMILARITIES[name]


def median_bandwidth(points: torch.Tensor) -> float:
    """Median heuristic: median pairwise Euclidean distance of `points` ([n, d]); 1.0 if all points coincide."""
    dist = torch.cdist(points.double(), points.double())
    off_diag = dist[~torch.eye(len(points), dtype=torch.bool)]
    sigma = float(off_diag.median()) if off_diag.numel() else 0.0
    return sigma if sigma > 0 else 1.0


@register_similarity("rbf")
def rbf_paired(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Sample-paired RBF similarity: `mean_i exp(-||x_i - y_i||^2 / (2 sigma^2))`."""
    sq = (x.double() - y.double()).pow(2).sum(dim=-1)
    return float(torch.exp(-sq / (2.0 * sigma**2)).mean())


@register_similarity("cosine")
def cosine(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Mean cosine similarity of paired representations, mapped from [-1, 1] to [0, 1]."""
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1, eps=1e-12)
    return float((cos.mean() + 1.0) / 2.0)


def _centered_gram_hsic(kx: torch.Tensor, ky: torch.Tensor) -> float:
    n = kx.shape[0]
    h = torch.eye(n, dtype=kx.dtype) - 1.0 / n
    return float((h @ kx @ h * ky).sum())


def _cka_from_grams(kx: torch.Tensor, ky: torch.Tensor) -> float:
    hxy = _centered_gram_hsic(kx, ky)
    hxx = _centered_gram_hsic(kx, kx)
    hyy = _centered_gram_hsic(ky, ky)
    if hxx <= 0 or hyy <= 0:
        # A constant representation carries no structure: equal only to itself.
        return 1.0 if torch.equal(kx, ky) else 0.0
    return max(0.0, min(1.0, hxy / (hxx * hyy) ** 0.5))


@register_similarity("linear_cka")
def linear_cka(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Linear CKA (Kornblith et al. 2019, https://arxiv.org/abs/1905.00414)."""
    x, y = x.double(), y.double()
    return _cka_from_grams(x @ x.T, y @ y.T)


@register_similarity("rbf_cka")
def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """RBF-kernel CKA; each model's Gram matrix uses its own median-distance bandwidth (Kornblith et al. 2019)."""
    x, y = x.double(), y.double()
    kx = torch.exp(-torch.cdist(x, x).pow(2) / (2.0 * median_bandwidth(x) ** 2))
    ky = torch.exp(-torch.cdist(y, y).pow(2) / (2.0 * median_bandwidth(y) ** 2))
    return _cka_from_grams(kx, ky)


def layer_similarities(reps: list[torch.Tensor], name: str = "rbf") -> torch.Tensor:
    """Similarity of every pair of models at every layer.

    Args:
        reps: one tensor per model, each `[L+1, n_samples, hidden]` (same probes, same order).
        name: a registered kernel name.

    Returns:
        `[L+1, K, K]` symmetric similarities with ones on the diagonal.
    """
    fn = get_similarity(name)
    if len(reps) < 2:
        raise ValueError(f"Need at least two models to compare, got {len(reps)}.")
    shape = reps[0].shape
    for i, r in enumerate(reps):
        if r.shape != shape:
            raise ValueError(f"Representation {i} has shape {tuple(r.shape)}, expected {tuple(shape)} like model 0.")
    n_layers, n_models = shape[0], len(reps)
    sims = torch.ones(n_layers, n_models, n_models, dtype=torch.float64)
    for layer in range(n_layers):
        sigma = median_bandwidth(torch.cat([r[layer] for r in reps]))
        for a in range(n_models):
            for b in range(a + 1, n_models):
                s = fn(reps[a][layer], reps[b][layer], sigma)
                sims[layer, a, b] = sims[layer, b, a] = s
    return sims
