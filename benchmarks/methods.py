"""Merge baselines and RECALL variants for the continual benchmark, as small pure functions on state dicts.

A state dict here is ``dict[str, torch.Tensor]`` (fp32, CPU) holding only the *shared* parameters of a model: for the
encoder (MiniLM) the task heads are kept apart, one per task, and never merged; for the decoder (SmolLM2) it is the
whole model with tied duplicates dropped (``lm_head.weight`` is ``embed_tokens.weight``, so it lives at layer 0).

Every merge method has a name in ``METHODS`` (a registry of families) and a spec string ``family`` or
``family:key=value,key=value`` (e.g. ``recall:tau=0.05,sim=linear_cka``, ``interp:alpha=0.7``); ``PRESETS`` gives
short names to common specs. ``parse_method`` refuses an unknown family or option and lists the valid ones.

Protocols (see ``benchmarks/continual.py``):

* ``chain``: task t is fine-tuned from the method's own deployed model ``D_{t-1}``; the method folds the new model
  ``N_t`` into ``D_{t-1}``.
* ``from-base``: every task is fine-tuned once from the base; at step t the method folds ``N_t`` into its deployed
  model. Task arithmetic, TIES, DARE and LiNeS are multi-model merges: at step t they merge the task vectors of all
  ``t`` task models seen so far (they store every task model; RECALL and interpolation keep only the deployed model).

Step 1 deploys the first task model as is for every folding method (there is nothing to merge it with); the
task-vector methods deploy ``base + merge(tau_1)`` (e.g. ``base + lambda * tau_1``) as their formula says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from recall_hf.fusion import fuse_tensor
from recall_hf.weights import task_vector_coefficients

State = dict[str, torch.Tensor]
LayerOf = Callable[[str], int]


# ----------------------------------------------------------------------------------------------- state-dict algebra


def _float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def linear_combination(states: list[State], coeffs: list[float]) -> State:
    """``sum_k coeffs[k] * states[k]`` for float tensors (fp32); non-float tensors are copied from the last state."""
    out = {}
    for name, last in states[-1].items():
        if _float(last):
            out[name] = fuse_tensor([s[name] for s in states], torch.tensor(coeffs, dtype=torch.float64), name)
        else:
            out[name] = last.clone()
    return out


def interpolate(deployed: State, new: State, alpha: float) -> State:
    """Plain weight interpolation ``(1 - alpha) * deployed + alpha * new`` (alpha = 0.5: even average)."""
    return linear_combination([deployed, new], [1.0 - alpha, alpha])


def running_mean(deployed: State, new: State, step: int) -> State:
    """Incremental mean of task models: ``D_t = ((t-1) D_{t-1} + N_t) / t`` (model soup / uniform averaging)."""
    return linear_combination([deployed, new], [(step - 1) / step, 1.0 / step])


def task_vector(model: State, base: State) -> State:
    """``tau = theta_model - theta_base`` (Ilharco et al. 2023, "Editing models with task arithmetic", ICLR)."""
    return {n: (model[n] - base[n]) if _float(base[n]) else torch.zeros_like(base[n]) for n in base}


def add_vector(base: State, vector: State, scale: float = 1.0) -> State:
    """``base + scale * vector`` (non-float tensors copied from ``base``)."""
    return {n: (base[n] + scale * vector[n]) if _float(base[n]) else base[n].clone() for n in base}


def task_arithmetic(base: State, vectors: list[State], lam: float) -> State:
    """Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): ``theta = theta_0 + lam * sum_k tau_k``."""
    out = {}
    for n, b in base.items():
        if not _float(b):
            out[n] = b.clone()
            continue
        acc = b.clone()
        for v in vectors:
            acc.add_(v[n], alpha=lam)
        out[n] = acc
    return out


def ties_merge(base: State, vectors: list[State], lam: float = 1.0, density: float = 0.2) -> State:
    """TIES-Merging (Yadav et al. 2023, "Resolving interference when merging models", NeurIPS, arXiv 2306.01708).

    Per tensor: (1) trim every task vector to its top-``density`` entries by magnitude, (2) elect a sign per entry
    (sign of the sum of trimmed values), (3) disjoint mean: average only the values that agree with the elected sign;
    then ``theta = theta_0 + lam * merged``.
    """
    if not 0 < density <= 1:
        raise ValueError(f"TIES density must be in (0, 1], got {density}.")
    out = {}
    for n, b in base.items():
        if not _float(b):
            out[n] = b.clone()
            continue
        stack = torch.stack([v[n].reshape(-1) for v in vectors])  # [K, P]
        keep = max(1, int(round(density * stack.shape[1])))
        if keep < stack.shape[1]:
            thresh = stack.abs().kthvalue(stack.shape[1] - keep + 1, dim=1, keepdim=True).values
            stack = torch.where(stack.abs() >= thresh, stack, torch.zeros_like(stack))
        sign = torch.sign(stack.sum(dim=0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        merged = (stack * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)
        out[n] = b + lam * merged.reshape(b.shape)
    return out


def dare_vectors(vectors: list[State], drop: float, seed: int) -> list[State]:
    """DARE (Yu et al. 2024, "Language models are Super Mario", ICML, arXiv 2311.03099): drop each delta entry with
    probability ``drop`` and rescale the survivors by ``1 / (1 - drop)``. Seeded, deterministic."""
    if not 0 <= drop < 1:
        raise ValueError(f"DARE drop rate must be in [0, 1), got {drop}.")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in vectors:
        dv = {}
        for n in sorted(v):
            t = v[n]
            if not _float(t) or drop == 0:
                dv[n] = t
                continue
            mask = torch.rand(t.shape, generator=gen) >= drop
            dv[n] = t * mask / (1.0 - drop)
        out.append(dv)
    return out


def dare_merge(base: State, vectors: list[State], lam: float, drop: float = 0.9, seed: int = 0) -> State:
    """DARE + task arithmetic (Yu et al. 2024): ``theta_0 + lam * sum_k DARE(tau_k)``."""
    return task_arithmetic(base, dare_vectors(vectors, drop, seed), lam)


def lines_merge(
    base: State, vectors: list[State], layer_of: LayerOf, num_layers: int, alpha: float, beta: float
) -> State:
    """LiNeS-style layer schedule (Wang et al. 2024, "LiNeS: post-training layer scaling prevents forgetting and
    enhances model merging", arXiv 2410.17146): the summed task vector is scaled per layer by
    ``lambda(l) = alpha + beta * l / L`` (l = 0 embeddings .. L last block and heads), so shallow layers stay near
    the base / the average and deep layers keep more of the task updates. A fixed schedule: no data, no similarity.
    """
    out = {}
    for n, b in base.items():
        if not _float(b):
            out[n] = b.clone()
            continue
        scale = alpha + beta * layer_of(n) / num_layers
        acc = b.clone()
        for v in vectors:
            acc.add_(v[n], alpha=scale)
        out[n] = acc
    return out


def layerwise_fuse(states: list[State], weights: torch.Tensor, layer_of: LayerOf) -> State:
    """RECALL fusion (SPEC 2.5) in memory: ``theta[p] = sum_k w[layer(p), k] * theta_k[p]`` with the library's
    ``recall_hf.fusion.fuse_tensor``; non-float tensors are copied from the newest (last) state."""
    out = {}
    for name, last in states[-1].items():
        if _float(last):
            out[name] = fuse_tensor([s[name] for s in states], weights[layer_of(name)], name)
        else:
            out[name] = last.clone()
    return out


def layerwise_task_vectors(base: State, states: list[State], coeffs: torch.Tensor, layer_of: LayerOf) -> State:
    """``theta[p] = theta_0[p] + sum_k c[layer(p), k] * (theta_k[p] - theta_0[p])``: per-layer task-vector scaling."""
    out = {}
    for name, b in base.items():
        if not _float(b):
            out[name] = states[-1][name].clone()
            continue
        c = coeffs[layer_of(name)].tolist()
        acc = b.clone()
        for s, ck in zip(states, c):
            if ck != 0.0:
                acc.add_(s[name] - b, alpha=ck)
        out[name] = acc
    return out


def recall_tv_coefficients(weights: torch.Tensor, task_counts: list[int] | None = None) -> torch.Tensor:
    """RECALL task-vector coefficients: the library's `fusion="task_vector"` (`recall_hf.weights`)."""
    return task_vector_coefficients(weights, task_counts)


def recall_ta_coefficients(weights: torch.Tensor, task_counts: list[int], lam: float) -> torch.Tensor:
    """RECALL-shaped task arithmetic (a benchmark variant): the deployed model's task vectors are kept whole
    (coefficient 1) and the new task vector gets ``lam * w_new / (m_new / sum m)`` per layer, i.e. ``lam`` times the
    ratio of RECALL's weight to the uniform share. Where all models agree this is task arithmetic with ``lam``; where
    the new model diverges RECALL's weight grows and so does the new update, a data-driven LiNeS-like schedule.
    Old updates are never shrunk (plain ``tv=1`` shrinks them by ``exp((s - 1) / tau)`` at every step).
    Models with count 0 (the base) get 0."""
    counts = torch.tensor([float(c) for c in task_counts], dtype=weights.dtype)
    coeffs = (counts > 0).to(weights.dtype).expand_as(weights).clone()
    coeffs[:, -1] = lam * weights[:, -1] * counts.sum() / counts[-1].clamp_min(1.0)
    return coeffs


# ----------------------------------------------------------------------------------------------- method registry


@dataclass(frozen=True)
class Family:
    """A method family: its protocols, options with defaults, and a one-line description."""

    name: str
    protocols: tuple[str, ...]
    options: dict[str, Any]
    doc: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("seqft", ("chain",), {}, "sequential fine-tuning: deploy the new task model as is (no merge)"),
        Family(
            "interp",
            ("chain", "from-base"),
            {"alpha": 0.5},
            "D_t = (1 - alpha) D_{t-1} + alpha N_t (alpha 0.5 = even incremental average)",
        ),
        Family("mean", ("chain", "from-base"), {}, "running mean D_t = ((t-1) D_{t-1} + N_t) / t"),
        Family("ta", ("from-base",), {"lam": 0.5}, "task arithmetic: base + lam * sum of task vectors so far"),
        Family(
            "ties",
            ("from-base",),
            {"lam": 1.0, "density": 0.2},
            "TIES: trim to top density, elect sign, disjoint mean; base + lam * merged",
        ),
        Family(
            "dare",
            ("from-base",),
            {"lam": 0.5, "drop": 0.9},
            "DARE: drop p of each task vector, rescale 1/(1-p), then task arithmetic with lam",
        ),
        Family(
            "lines",
            ("from-base",),
            {"alpha": -1.0, "beta": 0.5},
            "LiNeS-style: sum of task vectors scaled by alpha + beta * l / L (alpha < 0 means 1/t)",
        ),
        Family(
            "recall",
            ("chain", "from-base"),
            {
                "tau": 0.5,
                "sim": "rbf",
                "prior": 1,
                "norm": 0,
                "target": "continual",
                "base": 0,
                "self": 0,
                "old": 0,
                "tv": 0,
                "two_sided": 0,
                "lam": 0.0,
                "k": 32,
            },
            "RECALL: per-layer softmax weights from representation similarity on typical samples "
            "(tau, sim=rbf|linear_cka|rbf_cka|cosine, prior=count prior, norm=depth normalisation, "
            "target=continual|multi, base=include the base as a third model, self=N self-generated probes "
            "(decoder), old=1 add the typical samples earlier tasks' models picked (what their drops carried), "
            "two_sided=1 judge self-probes / old samples against the deployed model, "
            "tv=1 task-vector scaling w/max(w) instead of convex weights (from-base), lam>0 with tv=1: old task "
            "vectors kept whole and the new one scaled by lam * w_new / uniform share (from-base), k=typical samples)",
        ),
        Family(
            "calibrated",
            ("chain", "from-base"),
            {"new": 0.0, "k": 32, "norm": 0, "rule": "mean", "diag": 0, "grid": 0, "steps": 4},
            "calibrated fold (recall_hf.calibrate): D + a (N - P), P = D (chain) or the base (from-base), a picked "
            "per step among 0, 0.5, 1, up to two more multiples of 1/8 that a quadratic model of each task's "
            "divergence along a proposes (grid=1: every multiple of 1/8 instead) and N as is, by the fingerprint KL "
            "of every task so "
            "far on its typical samples (new>0: the newest task's share of the objective, else tasks equal; "
            "norm=1: each task's KL divided by its own model's information scale; rule=minimax: the largest share of "
            "a task's knowledge lost beyond its better endpoint; k=typical samples; steps=positions an LM fingerprint "
            "keeps per sample, the prompt's end and steps-1 greedy tokens (library default 4); diag=1: record every "
            "candidate's test accuracy, divergence on unused training examples and top-1 agreement, for "
            "benchmarks.calibrated_diag)",
        ),
    ]
}

# Short names for the specs the default method lists use.
PRESETS: dict[str, str] = {
    "seqft": "seqft",
    "mean": "mean",
    "interp-0.5": "interp:alpha=0.5",
    "ta": "ta:lam=0.5",
    "ties": "ties:lam=1.0,density=0.2",
    "dare": "dare:lam=0.5,drop=0.9",
    "lines": "lines:alpha=-1,beta=0.5",
    "recall": "recall",
    "recall-noprior": "recall:prior=0",
    "recall-norm": "recall:norm=1",
    "recall-multi": "recall:target=multi",
    "recall-base": "recall:base=1",
    "recall-cka": "recall:sim=linear_cka",
    "recall-cos": "recall:sim=cosine",
    "recall-self": "recall:self=16",
    "recall-self2": "recall:self=16,two_sided=1",
    "recall-old2": "recall:old=1,two_sided=1",
    "recall-tv": "recall:tv=1",
}


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method: family, options (defaults filled in), and the label used in tables."""

    family: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def supports(self, protocol: str) -> bool:
        return protocol in FAMILIES[self.family].protocols


def _convert(value: str, default: Any, where: str) -> Any:
    try:
        if isinstance(default, bool):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a {type(default).__name__}.") from None
    return value


def valid_names() -> str:
    fams = "; ".join(
        f"{f.name} ({', '.join(f'{k}={v}' for k, v in f.options.items()) or 'no options'})" for f in FAMILIES.values()
    )
    return f"presets: {', '.join(PRESETS)}; families: {fams}"


def parse_method(text: str) -> MethodSpec:
    """Parse ``preset`` or ``family[:key=value,...]``; a bad name or option raises a ValueError listing valid ones."""
    text = text.strip()
    spec = PRESETS.get(text, text)
    family, _, rest = spec.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"Unknown method {text!r}. Valid {valid_names()}.")
    fam = FAMILIES[family]
    options = dict(fam.options)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fam.options:
            raise ValueError(
                f"Method {text!r}: bad option {item!r}; {family} takes {', '.join(fam.options) or 'no options'}."
            )
        options[key] = _convert(value, fam.options[key], f"method {text!r} option {key}")
    if family == "recall":
        from recall_hf.similarity import SIMILARITIES

        if options["sim"] not in SIMILARITIES:
            raise ValueError(f"Method {text!r}: sim must be one of {', '.join(sorted(SIMILARITIES))}.")
        if options["target"] not in ("continual", "multi"):
            raise ValueError(f"Method {text!r}: target must be continual or multi.")
        if not options["tau"] > 0:
            raise ValueError(f"Method {text!r}: tau must be > 0.")
    if family == "calibrated":
        from recall_hf.config import CALIBRATE_RULES

        if options["rule"] not in CALIBRATE_RULES:
            raise ValueError(f"Method {text!r}: rule must be one of {', '.join(CALIBRATE_RULES)}.")
        if options["steps"] < 1:
            raise ValueError(f"Method {text!r}: steps must be >= 1.")
    return MethodSpec(family, options, label=text)


def method_label(spec: MethodSpec) -> str:
    """A canonical label: ``family`` plus the options that differ from the family defaults."""
    fam = FAMILIES[spec.family]
    diff = [f"{k}={v}" for k, v in spec.options.items() if v != fam.options[k]]
    return spec.family + (f":{','.join(diff)}" if diff else "")


def expand_sweeps(items: list[str]) -> list[str]:
    """Expand ``family:key=a|b|c`` into one spec per value (e.g. ``recall:tau=0.05|0.1|0.5|1``)."""
    out = []
    for item in items:
        family, _, rest = item.partition(":")
        parts = [p for p in rest.split(",") if p] if rest else []
        combos = [[]]
        for p in parts:
            key, _, value = p.partition("=")
            combos = [c + [f"{key}={v}"] for c in combos for v in value.split("|")]
        out += [family + (":" + ",".join(c) if c else "") for c in combos] if rest else [item]
    return out


# ----------------------------------------------------------------------------------------------- RECALL weights


def recall_layer_weights(
    reps: list[torch.Tensor], options: dict[str, Any], task_counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities ``[L+1, K, K]`` and merge coefficients ``[L+1, K]`` from per-model representations
    ``[L+1, n, hidden]`` of the same probes, with the library's public in-memory entry point
    (``recall_hf.merge_coefficients``)."""
    from recall_hf import RecallConfig, merge_coefficients

    config = RecallConfig(similarity=options["sim"], tau=options["tau"], mode=options["target"],
                          task_count_prior=bool(options["prior"]), normalize_depth=bool(options["norm"]))
    return merge_coefficients(reps, config, task_counts)


def recall_two_sided_weights(
    task_reps: list[torch.Tensor],
    own_reps: list[torch.Tensor],
    options: dict[str, Any],
    task_counts: list[int],
    deployed_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-sided RECALL (a benchmark variant, not in the paper): on the new task's typical samples the target is the
    new model (as in RECALL), on probes standing for old knowledge (texts the deployed model generated itself) the
    target is the deployed model. Score of model k at layer l:
    ``0.5 * (s_task_l(k, new) + s_own_l(k, deployed))``, then the library's softmax with temperature and count prior.

    Plain RECALL can only move a layer from the running mean towards the new model (``score(new) = 1`` is the
    maximum); here a layer where the new model drifts on the deployed model's own texts moves back towards the
    deployed model. Implemented with ``layer_weights`` by writing the combined scores into the target column.

    Returns:
        The combined similarity tensor (target column replaced) and the weights ``[L+1, K]``.
    """
    from recall_hf.similarity import layer_similarities
    from recall_hf.weights import layer_weights

    if options["target"] != "continual":
        raise ValueError("two_sided=1 needs target=continual.")
    s_task = layer_similarities(task_reps, options["sim"])
    s_own = layer_similarities(own_reps, options["sim"])
    combined = s_task.clone()
    combined[:, :, -1] = 0.5 * (s_task[:, :, -1] + s_own[:, :, deployed_index])
    counts = task_counts if options["prior"] else None
    return combined, layer_weights(combined, options["tau"], "continual", counts, bool(options["norm"]))


def lines_alpha(alpha: float, step: int) -> float:
    """LiNeS shallow scale: ``alpha`` or ``1 / t`` when negative (the mean of the t task vectors)."""
    return alpha if alpha >= 0 else 1.0 / max(1, step)


def describe_methods() -> str:
    """Help text: every family with its options and protocols."""
    lines = []
    for f in FAMILIES.values():
        opts = ", ".join(f"{k}={v}" for k, v in f.options.items()) or "-"
        lines.append(f"  {f.name:<7} [{'/'.join(f.protocols)}] {f.doc}; options: {opts}")
    lines.append("  presets: " + ", ".join(f"{k}={v}" for k, v in PRESETS.items() if k != v))
    return "\n".join(lines)


__all__ = [
    "FAMILIES",
    "PRESETS",
    "MethodSpec",
    "add_vector",
    "dare_merge",
    "describe_methods",
    "expand_sweeps",
    "interpolate",
    "layerwise_fuse",
    "layerwise_task_vectors",
    "lines_merge",
    "linear_combination",
    "parse_method",
    "recall_layer_weights",
    "recall_ta_coefficients",
    "recall_tv_coefficients",
    "recall_two_sided_weights",
    "running_mean",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
]
