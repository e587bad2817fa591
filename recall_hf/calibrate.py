"""Calibrated fold (SPEC 2.7): choose the fold whose behaviour stays closest to every folded task's fingerprint.

Inputs: the deployed model D, the new task model N and N's parent P (P = D in the chain protocol, the base in the
from-base protocol). Candidates are `D + a_l (N - P)` with per-layer coefficients `a_l` from two families that hold
today's rules as special cases:

* `constant`: `a_l = a` (plain interpolation when P = D; task arithmetic with lambda `a` on the new task vector);
* `profile`: `a_l = min(1, s * profile_l)`, RECALL's per-layer weight of the newest model scaled by `s`
  (`s = 1` with P = D is today's convex RECALL fold of two models);

plus both endpoints: keep D (`a = 0`) and take N as it is (`a = 1` when P = D; N itself otherwise). Then the search
refines the constant line: a model of each task's divergence along `a` (`divergence_at`: the quadratic through the
three nearest scored folds, or `c (a - x0)^2` next to a fold `x0` where the task's own model lies) predicts every
multiple of 1/8, and the best prediction is scored if it beats the best candidate so far, or, the first time, if the
best so far is an end of the line (at most `refine_steps` times; `propose_constant`). Run on the 86 stored benchmark
decisions (`benchmarks.calibrated_diag.replay_search`), this picks what the old grid of 7 picked in every one, with
4.05 replays instead of 6.95. Optionally each layer group's coefficients are then nudged once.
Each candidate is scored by replaying every task's fingerprint (`fingerprint.py`). A merge of full models scores
both endpoints in its representation step instead (`endpoint_pass`): the replays of D and N over the new task's
fingerprint also give RECALL's representations of its typical samples, so the search replays only the candidates
between them. Raw KLs of a confident head and an
unsure one are not comparable (measured: the confident tasks then decide every fold), so each task's divergence is
divided by its information scale, how far its own model's stored predictions are from a uniform guess
(`fingerprint.information_scale`). The objective (`CalibrationConfig.rule`) is either `minimax`, the default: the
largest over tasks of that share lost beyond the task's better endpoint, so a new task counts as much as each old one
however many are folded; or `mean`: the weighted mean of the shares (tasks equal by default, the newest task's share
settable). The minimum wins; since both endpoints are candidates, the chosen fold never scores worse than either of
them.

Memory: one working model plus one delta `N - P` (two models in fp32). The working model moves from candidate to
candidate in place (`theta += (a'_l - a_l) * delta`); no candidate is written to disk. Models larger than two fp32
copies in memory are not handled: use `calibrate=False` for them. The chosen coefficients come back as per-layer
merge weights over the input folders, which `fusion.fuse_checkpoints` streams into the output.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import CALIBRATE_RULES
from .fingerprint import (
    FINGERPRINT_NAME,
    Fingerprint,
    TaskScore,
    information_scale,
    load_fingerprint,
    load_task_model,
    output_size,
    score_and_represent,
    score_tasks,
    score_tasks_bounded,
)
from .layers import LayerMap
from .safetensors_io import CheckpointReader

logger = logging.getLogger(__name__)


RULES = CALIBRATE_RULES


@dataclass
class CalibrationConfig:
    """The calibrated fold's search.

    Args:
        alphas (`tuple[float, ...]`, *optional*, defaults to `(0.5,)`):
            Constant coefficients tried besides the endpoints 0 and 1 before the refinement.
        scales (`tuple[float, ...]`, *optional*, defaults to `(1.0,)`):
            Scales `s` of RECALL's per-layer profile tried (`a_l = min(max_coefficient, s * profile_l)`; `s = 1` in
            the chain form is today's convex RECALL fold).
        refine (`bool`, *optional*, defaults to `True`):
            Refine the constant line: folds proposed by the quadratic model of each task's divergence along `a`.
        refine_steps (`int`, *optional*, defaults to `2`):
            Most constant folds the model proposes (each scored only if predicted to beat the best, or, the first,
            when the best so far is an end of the line).
        layer_groups (`int`, *optional*, defaults to `0`):
            After the family search, nudge each of this many contiguous layer groups by `+-group_step` once
            (0: off).
        group_step (`float`, *optional*, defaults to `0.25`):
            Step of the per-group nudges.
        max_coefficient (`float`, *optional*, defaults to `1.0`):
            Largest per-layer coefficient (1: never extrapolate past the new model's task vector).
        new_task_weight (`float`, *optional*, defaults to `None`):
            Share of the objective given to the newest task (the others split the rest equally); `None`: all
            tasks equal.
        batch_size (`int`, *optional*, defaults to `8`):
            Batch size of the fingerprint replays.
        device (`str`, *optional*, defaults to `"cpu"`):
            Device holding the working model and the delta.
        prune (`bool`, *optional*, defaults to `True`):
            Stop replaying a candidate once it cannot win (every per-sample divergence is >= 0, so the replayed part
            bounds its objective from below): the same choice in less time; a pruned candidate's report has a lower
            bound for `objective`, `pruned: true` and only the tasks replayed to the end. The constant line's folds
            (the endpoints `keep` and `new` among them) are always scored in full: the refinement's model and the
            daemon's fingerprint gate read them; profile and layer-group candidates may be pruned.
        screen_samples (`int`, *optional*, defaults to `0`):
            A cheaper search that may choose differently (0: off): score every candidate on this many samples per
            task (spread evenly), then only the `finalists` best in full; the fold is the best finalist.
        finalists (`int`, *optional*, defaults to `2`):
            Screened candidates re-scored on every sample (with `screen_samples`).
        normalize (`bool`, *optional*, defaults to `True`):
            `rule="mean"`: divide each task's divergence by its fingerprint's information scale
            (`fingerprint.information_scale`): the objective becomes the mean share of each task model's knowledge
            lost, whatever its confidence. `False`: the raw KLs (measured worse: a confident head's KL outweighs
            an unsure one's).
        rule (`str`, *optional*, defaults to `"minimax"`):
            `mean`: the weighted mean of the per-task divergences. `minimax`: the largest over tasks of a task's
            divergence above its better endpoint (keep D or take N), divided by its information scale (and
            weighted by `weight / max weight`): the fold where the worst-off task has lost the least of what its
            own model knows, whatever the number of tasks. With `screen_samples` both endpoints are finalists too.
    """

    alphas: tuple[float, ...] = field(default=(0.5,), metadata={"help": "Constant coefficients tried."})
    scales: tuple[float, ...] = field(default=(1.0,), metadata={"help": "Profile scales tried."})
    refine: bool = field(default=True, metadata={"help": "Refine the constant line with a quadratic model."})
    refine_steps: int = field(default=2, metadata={"help": "Most constant folds the quadratic model proposes."})
    layer_groups: int = field(default=0, metadata={"help": "Per-layer-group refinement groups (0: off)."})
    group_step: float = field(default=0.25, metadata={"help": "Step of the per-group nudges."})
    max_coefficient: float = field(default=1.0, metadata={"help": "Largest per-layer coefficient."})
    new_task_weight: float | None = field(default=None, metadata={"help": "Newest task's share of the objective."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the fingerprint replays."})
    device: str = field(default="cpu", metadata={"help": "Device of the working model and delta."})
    prune: bool = field(default=True, metadata={"help": "Stop scoring a candidate once it cannot win."})
    screen_samples: int = field(default=0, metadata={"help": "Screen candidates on this many samples per task."})
    finalists: int = field(default=2, metadata={"help": "Screened candidates re-scored in full."})
    normalize: bool = field(default=True, metadata={"help": "Divide each task's divergence by its scale."})
    rule: str = field(default="minimax", metadata={"help": "minimax or mean over tasks.", "choices": RULES})

    def __post_init__(self) -> None:
        values = [*self.alphas, *self.scales]
        if any(not isinstance(v, (int, float)) or v < 0 for v in values):
            raise ValueError(f"CalibrationConfig alphas and scales must be >= 0, got {values}.")
        if not self.max_coefficient > 0:
            raise ValueError(f"CalibrationConfig.max_coefficient must be > 0, got {self.max_coefficient}.")
        if self.refine_steps < 0:
            raise ValueError(f"CalibrationConfig.refine_steps must be >= 0, got {self.refine_steps}.")
        if self.layer_groups < 0 or not self.group_step > 0:
            raise ValueError("CalibrationConfig.layer_groups must be >= 0 and group_step > 0.")
        if self.new_task_weight is not None and not 0 < self.new_task_weight <= 1:
            raise ValueError(f"CalibrationConfig.new_task_weight must be in (0, 1], got {self.new_task_weight}.")
        if self.batch_size < 1:
            raise ValueError(f"CalibrationConfig.batch_size must be >= 1, got {self.batch_size}.")
        if self.rule not in RULES:
            raise ValueError(f"CalibrationConfig.rule must be one of {RULES}, got {self.rule!r}.")
        if self.screen_samples < 0 or self.finalists < 1:
            raise ValueError(f"CalibrationConfig.screen_samples must be >= 0 and finalists >= 1, got "
                             f"{self.screen_samples} and {self.finalists}.")


@dataclass
class Candidate:
    """One fold tried: its per-layer coefficients (`None`: the new model as it is) and its scores.

    A `pruned` candidate was stopped once it could no longer win: `objective` is a lower bound of its objective
    (above the best one's) and `scores` holds only the tasks replayed to the end.
    """

    name: str
    family: str
    param: float | None
    coefficients: list[float] | None
    scores: dict[str, dict[str, float]]
    objective: float
    pruned: bool = False
    predicted: float | None = None  # proposed by the quadratic model: its predicted objective


# ------------------------------------------------------------------------------------------------- pure math


def task_weights(
    tasks: list[str], new_task: str | None, new_task_weight: float | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Objective weights per task, summing to 1: `weights` if given, else equal, or `new_task_weight` for the
    newest task and an equal split of the rest for the others."""
    if not tasks:
        raise ValueError("The calibrated fold needs at least one task fingerprint.")
    if weights is not None:
        missing = sorted(set(tasks) - set(weights))
        if missing or any(not weights[t] >= 0 for t in tasks) or not sum(weights[t] for t in tasks) > 0:
            raise ValueError(f"task weights must give every task {sorted(tasks)} a weight >= 0 (not all 0).")
        raw = {t: float(weights[t]) for t in tasks}
    elif new_task_weight is not None and new_task in tasks and len(tasks) > 1:
        rest = (1.0 - new_task_weight) / (len(tasks) - 1)
        raw = {t: (new_task_weight if t == new_task else rest) for t in tasks}
    else:
        raw = dict.fromkeys(tasks, 1.0)
    total = sum(raw.values())
    return {t: w / total for t, w in raw.items()}


def _divergence(score: TaskScore | Mapping[str, float]) -> float:
    return score.divergence if isinstance(score, TaskScore) else float(score["divergence"])


def objective(scores: Mapping[str, TaskScore], weights: Mapping[str, float]) -> float:
    """Weighted mean over tasks of the fingerprint divergence."""
    return float(sum(weights[t] * _divergence(scores[t]) for t in weights))


def minimax_coefficients(weights: Mapping[str, float], scales: Mapping[str, float]) -> dict[str, float]:
    """`(w_t / max w) / scale_t` per task: what one nat of a task's divergence costs in the minimax objective."""
    top = max(weights.values())
    return {t: w / top / scales[t] for t, w in weights.items()}


def minimax_regret(
    divergences: Mapping[str, float], floor: Mapping[str, float], scales: Mapping[str, float],
    weights: Mapping[str, float],
) -> float:
    """`max_t (w_t / max w) * max(0, d_t - floor_t) / scale_t`: the largest share of a task's knowledge lost beyond
    its better endpoint."""
    coef = minimax_coefficients(weights, scales)
    return max(coef[t] * max(0.0, divergences[t] - floor[t]) for t in coef)


@dataclass
class Objective:
    """What a candidate's per-task scores cost (`CalibrationConfig.rule`).

    `weights` per task (with `normalize`, already divided by `scales`); `scales` the information scales (`None`
    when unused); `floor` each task's better endpoint divergence, set by `anchor` once keep and new are scored
    (`minimax` only: until then its value is `inf`).
    """

    weights: dict[str, float]
    rule: str = "mean"
    scales: dict[str, float] | None = None
    floor: dict[str, float] | None = None

    @property
    def linear(self) -> bool:
        """A weighted sum of divergences (`mean`), else a max over tasks that needs `anchor` first."""
        return self.rule == "mean"

    def bounds(self) -> tuple[dict[str, float], dict[str, float] | None] | None:
        """`(weights, offsets)` for `score_tasks_bounded`, whose bounded value is then a lower bound of this
        objective; `None` while a `minimax` objective has no floor yet."""
        if self.linear:
            return self.weights, None
        if self.floor is None:
            return None
        coef = minimax_coefficients(self.weights, self.scales)
        return coef, {t: coef[t] * self.floor[t] for t in coef}

    def value(self, scores: Mapping[str, TaskScore | Mapping[str, float]]) -> float:
        if self.rule == "mean":
            return objective(scores, self.weights)
        if self.floor is None:
            return math.inf
        return minimax_regret({t: _divergence(scores[t]) for t in self.weights}, self.floor, self.scales,
                              self.weights)

    def anchor(self, keep: Candidate, new: Candidate) -> None:
        """Take each task's better endpoint divergence as its floor (`minimax`)."""
        self.floor = {t: min(_divergence(keep.scores[t]), _divergence(new.scores[t])) for t in self.weights}


def build_objective(
    fingerprints: Mapping[str, Fingerprint], new_task: str | None, config: CalibrationConfig,
    weights: Mapping[str, float] | None, model,
) -> Objective:
    """The search's objective: `task_weights`, and each task's information scale where the rule needs it
    (`normalize`, `minimax`; LM scales use `model`'s vocabulary)."""
    tw = task_weights(list(fingerprints), new_task, config.new_task_weight, weights)
    if config.rule == "mean" and not config.normalize:
        return Objective(tw)
    scales = {t: information_scale(fingerprints[t], output_size(model)) for t in tw}
    if config.rule == "minimax":
        return Objective(tw, "minimax", scales)
    return Objective({t: w / scales[t] for t, w in tw.items()}, scales=scales)


def profile_coefficients(profile: torch.Tensor, scale: float, max_coefficient: float = 1.0) -> torch.Tensor:
    """`a_l = clamp(scale * profile_l, 0, max_coefficient)`."""
    return (profile.double() * scale).clamp(0.0, max_coefficient)


def merge_weights(coefficients: torch.Tensor | None, n_layers: int, from_base: bool) -> torch.Tensor:
    """Per-layer fusion weights over the input folders for a chosen fold.

    Chain (P = D), inputs `(D, N)`: `[1 - a_l, a_l]`. From-base, inputs `(P, D, N)`: `[-a_l, 1, a_l]`, or
    `[0, 0, 1]` for the new model as it is (`coefficients=None`). The newest model comes last, as `fusion` expects.
    """
    if coefficients is None:
        if not from_base:
            coefficients = torch.ones(n_layers, dtype=torch.float64)
        else:
            return torch.tensor([[0.0, 0.0, 1.0]] * n_layers, dtype=torch.float64)
    a = coefficients.double()
    if a.shape != (n_layers,):
        raise ValueError(f"coefficients shape {tuple(a.shape)} != ({n_layers},).")
    if not from_base:
        return torch.stack([1.0 - a, a], dim=-1)
    return torch.stack([-a, torch.ones_like(a), a], dim=-1)


def layer_groups(n_layers: int, groups: int) -> list[list[int]]:
    """`groups` contiguous, near-equal groups of layer indices `0..n_layers-1` (fewer when layers are few)."""
    groups = max(1, min(groups, n_layers))
    bounds = [round(i * n_layers / groups) for i in range(groups + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(groups) if bounds[i] < bounds[i + 1]]


REFINE_GRID = 0.125  # constant folds the quadratic model proposes: multiples of 1/8 (the 0.25 grid halved once)


def quadratic_at(points: Mapping[float, float], x: float) -> float:
    """The polynomial through the (up to) three of `points` (`{a: value}`) nearest `x`, evaluated at `x`: a quadratic,
    a line through two, the value of one (Lagrange form)."""
    near = sorted(points, key=lambda p: (abs(p - x), p))[:3]
    total = 0.0
    for i in near:
        term = points[i]
        for j in near:
            if j != i:
                term *= (x - j) / (i - j)
        total += term
    return total


def divergence_at(points: Mapping[float, float], a: float) -> float:
    """One task's divergence at `a` from its scored folds `{x: divergence}` (at least two).

    Where the task's own model lies on the line (its divergence there is 0, up to float noise: the new model in the
    chain form, the deployed one for the task it was fine-tuned on), the divergence is least there with zero slope, so
    between that fold `x0` and its nearest scored neighbour `x1` on `a`'s side it is `d(x1) ((a - x0) / (x1 - x0))^2`.
    Elsewhere: the quadratic through the three scored folds nearest `a` (`quadratic_at`), floored at 0.
    """
    top = max(points.values())
    for x0 in sorted((x for x, v in points.items() if v <= 1e-6 * top), key=lambda x: abs(x - a)):
        side = [x for x in points if (x - x0) * (a - x0) > 0]
        x1 = min(side, key=lambda x: abs(x - x0), default=None)
        if x1 is not None and abs(a - x0) <= abs(x1 - x0):
            return points[x1] * ((a - x0) / (x1 - x0)) ** 2
    return max(0.0, quadratic_at(points, a))


def predicted_divergences(
    line: Mapping[float, Mapping[str, float]], tasks: list[str], a: float
) -> dict[str, float] | None:
    """Each task's divergence at the constant fold `a` (`divergence_at`) from its scored folds on the line
    (`{a: {task: divergence}}`); `None` when a task has fewer than two scored folds."""
    out = {}
    for t in tasks:
        points = {x: d[t] for x, d in line.items() if t in d}
        if len(points) < 2:
            return None
        out[t] = divergence_at(points, a)
    return out


def refine_grid(top: float) -> list[float]:
    """Constant coefficients the refinement may propose: multiples of `REFINE_GRID` up to `top`, and `top`."""
    return sorted({round(i * REFINE_GRID, 6) for i in range(int(top / REFINE_GRID + 1e-9) + 1)} | {top})


# ------------------------------------------------------------------------------------------------- the search


class FoldSearch:
    """A working model moved in place among candidates `D + a_l * delta`, each candidate scored once.

    Args:
        model: the working model, currently holding D (coefficients all 0).
        delta: `N - P` per parameter name (parameters where it is zero may be left out).
        layers: RECALL layer index of every name in `delta`.
        n_layers: number of layers `L + 1`.
        fingerprints: every task's fingerprint, by name.
        weights: objective weight per task (`task_weights`), or an `Objective`.
        scorer: `scorer(model, fingerprints) -> {task: TaskScore}` (default `score_tasks`); a caller whose tasks
            each need their own head (one encoder, one classifier head per task) swaps heads in it.
        prune: with the default scorer, stop replaying a candidate once its objective must exceed the bound passed
            to `evaluate` (`score_tasks_bounded`; `minimax` once both endpoints anchor it); the choice stays the
            same, only pruned candidates' scores are partial.
    """

    def __init__(self, model, delta: dict[str, torch.Tensor], layers: dict[str, int], n_layers: int,
                 fingerprints: Mapping[str, Fingerprint], weights: Mapping[str, float] | Objective,
                 batch_size: int = 8, scorer: Callable[..., Mapping[str, TaskScore]] | None = None,
                 prune: bool = False):
        self.model, self.delta, self.layers = model, delta, layers
        self.params = dict(model.named_parameters())
        self.goal = as_objective(weights)
        self.fingerprints, self.weights, self.batch_size = fingerprints, self.goal.weights, batch_size
        self.prune = prune and scorer is None
        self.scorer = scorer or (lambda m, fps: score_tasks(m, fps, batch_size))
        self.a = torch.zeros(n_layers, dtype=torch.float64)
        self.tried: dict[tuple[float, ...], Candidate] = {}
        self.candidates: list[Candidate] = []
        self.cost = {t: float(fp.lengths.sum()) for t, fp in fingerprints.items()}

    @staticmethod
    def key(a: torch.Tensor) -> tuple[float, ...]:
        return tuple(round(x, 6) for x in a.tolist())

    @torch.no_grad()
    def move_to(self, a: torch.Tensor) -> None:
        """`theta += (a - a_current)_l * delta` for every parameter: one pass, no copy of the model."""
        step = (a.double() - self.a).tolist()
        for name, d in self.delta.items():
            s = step[self.layers[name]]
            if s != 0.0:
                self.params[name].add_(d, alpha=s)
        self.a = a.double().clone()

    def anchor(self, keep: Candidate, new: Candidate) -> None:
        """Anchor the objective on the endpoints' scores (`Objective.anchor`) and re-cost every candidate so far."""
        self.goal.anchor(keep, new)
        for cand in self.candidates:
            cand.objective = self.goal.value(cand.scores)

    def register(self, candidate: Candidate, a: torch.Tensor | None) -> Candidate:
        """Record a candidate scored elsewhere (the new model as loaded), under its coefficients when it has them."""
        if a is not None:
            self.tried.setdefault(self.key(a), candidate)
        self.candidates.append(candidate)
        return candidate

    def bound(self, top: float) -> float | None:
        """The best objective of the candidates scored in full whose coefficients the family grid holds (all in
        `[0, top]`: the ones the family and group searches compare), or `None`. A candidate above it can change no
        decision of the search, so its replay may stop there."""
        full = [c.objective for c in self.candidates
                if c.coefficients is not None and not c.pruned and max(c.coefficients) <= top]
        return min(full) if full else None

    def task_order(self) -> list[str]:
        """Tasks by the share of the objective per replayed token they had in the last candidate scored in full:
        the likeliest to exceed a bound early go first."""
        last = next((c for c in reversed(self.candidates) if not c.pruned), None)
        if last is None:
            return list(self.fingerprints)
        share = {t: self.weights.get(t, 0.0) * last.scores.get(t, {}).get("divergence", 0.0) / max(self.cost[t], 1.0)
                 for t in self.fingerprints}
        return sorted(self.fingerprints, key=lambda t: -share[t])

    def _score(self, name: str, family: str, param: float | None, a: torch.Tensor, bound: float | None) -> Candidate:
        bounds = self.goal.bounds() if self.prune and bound is not None else None
        if bounds is not None:
            margin = bound * (1 + 1e-9) + 1e-12  # float noise between the running sum and the objective never prunes
            scores, value, complete = score_tasks_bounded(self.model, self.fingerprints, bounds[0], margin,
                                                          self.batch_size, self.task_order(), bounds[1])
            if not complete:
                return Candidate(name, family, param, a.tolist(), {t: asdict(s) for t, s in scores.items()}, value,
                                 pruned=True)
        else:
            scores = self.scorer(self.model, self.fingerprints)
        return _scored(name, family, param, a.tolist(), scores, self.goal)

    def evaluate(self, name: str, family: str, param: float | None, a: torch.Tensor,
                 bound: float | None = None) -> Candidate:
        """Score the candidate with coefficients `a` (once: a repeat returns the first result); with `prune`, stop
        once its objective must exceed `bound`."""
        if self.key(a) in self.tried:
            return self.tried[self.key(a)]
        self.move_to(a)
        cand = self._score(name, family, param, a, bound)
        if math.isinf(cand.objective):  # minimax before both endpoints are scored
            logger.info("Calibrated fold: %s scored; its objective needs both endpoints", name)
        else:
            logger.info("Calibrated fold: %s objective %s%.5f", name, ">= " if cand.pruned else "", cand.objective)
        return self.register(cand, a)


def _constant(n: int) -> Callable[[float], torch.Tensor]:
    return lambda v: torch.full((n,), float(v), dtype=torch.float64)


def _line(search: FoldSearch) -> dict[float, dict[str, float]]:
    """Every scored constant fold, endpoints included, by its coefficient: its per-task divergences."""
    return {c.coefficients[0]: {t: s["divergence"] for t, s in c.scores.items()} for c in search.candidates
            if c.family in ("keep", "new", "constant") and c.coefficients and len(set(c.coefficients)) == 1}


def _at_line_end(search: FoldSearch, best: float, top: float) -> bool:
    """Whether the best candidate so far (objective `best` above float noise) is an end of the constant line,
    `a = 0` (keep D) or `a = top` (all of N's task vector): a fold that gives one side none of the other's, so one
    step inward is worth a replay even where the model does not predict a gain (it misses sigmoid-shaped divergences
    near an end)."""
    ends = ({0.0}, {top})
    return best > 1e-9 and any(c.objective == best and not c.pruned and c.coefficients and set(c.coefficients) in ends
                               for c in search.candidates)


def propose_constant(search: FoldSearch, config: CalibrationConfig, n: int) -> None:
    """Score up to `config.refine_steps` constant folds, each the best of `refine_grid` under the model of every
    task's divergence along `a` (`predicted_divergences`), while that prediction beats the best candidate so far (or,
    at the first step, while the best is an end of the line: `_at_line_end`). Each proposal's prediction is kept in its
    `predicted`."""
    top, coefs = config.max_coefficient, _constant(n)
    for step in range(config.refine_steps):
        line, best = _line(search), search.bound(top)
        if best is None:
            return
        predicted = {}
        for a in refine_grid(top):
            if search.key(coefs(a)) in search.tried:
                continue
            div = predicted_divergences(line, list(search.weights), a)
            if div is None:
                return
            predicted[a] = search.goal.value({t: {"divergence": v} for t, v in div.items()})
        a = min(predicted, key=predicted.get, default=None)
        if a is None or not (predicted[a] < best or (step == 0 and _at_line_end(search, best, top))):
            return
        search.evaluate(f"constant:{a:g}", "constant", a, coefs(a)).predicted = predicted[a]  # in full, as the grid


def _family_search(search: FoldSearch, profile: torch.Tensor | None, config: CalibrationConfig, n: int) -> None:
    """Both families over their grids, then the quadratic model's proposals on the constant line
    (`propose_constant`)."""
    top = config.max_coefficient
    families = {"constant": (sorted({0.0, min(1.0, top), *(min(a, top) for a in config.alphas)}), _constant(n))}
    if profile is not None:
        families["profile"] = (sorted(set(config.scales)), lambda v: profile_coefficients(profile, v, top))
    for family, (grid, coefs) in families.items():
        for v in grid:  # the constant line's folds in full: the refinement's model needs every task's divergence
            bound = search.bound(top) if family != "constant" else None
            search.evaluate(f"{family}:{v:g}", family, v, coefs(v), bound)
    if config.refine:
        propose_constant(search, config, n)


def _group_search(search: FoldSearch, start: Candidate, config: CalibrationConfig, n: int) -> None:
    """One pass over contiguous layer groups: move each group's coefficients by +-group_step, keep improvements."""
    a, best = torch.tensor(start.coefficients, dtype=torch.float64), start.objective
    for g, group in enumerate(layer_groups(n, config.layer_groups)):
        for sign in (1.0, -1.0):
            trial = a.clone()
            trial[group] = (trial[group] + sign * config.group_step).clamp(0.0, config.max_coefficient)
            if torch.equal(trial, a):
                continue
            cand = search.evaluate(f"group{g}{'+' if sign > 0 else '-'}:{start.name}", "group", None, trial, best)
            if cand.objective < best:
                a, best = trial, cand.objective
                break


def search_fold(
    search: FoldSearch, profile: torch.Tensor | None, config: CalibrationConfig, n_layers: int
) -> Candidate:
    """Run the whole search on a `FoldSearch` (the caller registers the new model's endpoint first); the best."""
    # Both endpoints are always scored in full: the daemon's fingerprint gate compares the chosen fold with `keep`.
    keep = search.evaluate("keep", "keep", 0.0, torch.zeros(n_layers, dtype=torch.float64))
    if not search.goal.linear:
        new = next((c for c in search.candidates if c.family == "new"), None)
        if new is None:  # the chain form's new model is the coefficients 1
            new = search.evaluate("new", "new", None, torch.ones(n_layers, dtype=torch.float64))
        search.anchor(keep, new)
    _family_search(search, profile, config, n_layers)
    if config.layer_groups:
        start = min((c for c in search.candidates if c.coefficients is not None), key=lambda c: c.objective)
        _group_search(search, start, config, n_layers)
    return min(search.candidates, key=lambda c: c.objective)


# ------------------------------------------------------------------------------------------------- the edge


@dataclass
class CalibratedFold:
    """The chosen fold as fusion input: `weights[l, k]` over `inputs` (newest last), and the search's report."""

    inputs: list[Path]
    weights: torch.Tensor
    chosen: Candidate
    report: dict


@torch.no_grad()
def _delta_and_deploy(model, deployed: Path, parent: Path, layer_map: LayerMap):
    """Turn the working model (holding N) into D, returning `delta = N - P` and each delta's layer.

    Reads D and P one tensor at a time; parameters where N equals P keep no delta.
    """
    readers = {deployed: CheckpointReader(deployed)}
    readers.setdefault(parent, CheckpointReader(parent))
    delta, layers = {}, {}
    try:
        for name, param in model.named_parameters():
            for reader in readers.values():
                info = reader.tensors.get(name)
                if info is None or tuple(info.shape) != tuple(param.shape):
                    raise ValueError(f"{reader.dir} has no tensor {name!r} of shape {tuple(param.shape)}; the "
                                     "calibrated fold needs models of one architecture.")
            p = readers[parent].get(name).to(param.device, torch.float32)
            d = param.detach().float() - p
            param.copy_(p if parent == deployed else readers[deployed].get(name))
            if torch.count_nonzero(d):
                delta[name], layers[name] = d, layer_map.layer_of(name)
    finally:
        for reader in readers.values():
            reader.close()
    return delta, layers


def check_profile(profile, n_layers: int) -> torch.Tensor | None:
    if profile is None:
        return None
    t = torch.as_tensor(profile, dtype=torch.float64).flatten()
    if t.numel() != n_layers or not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"profile must hold {n_layers} finite weights >= 0 (one per layer 0..L), got {t.tolist()}.")
    return t


def as_objective(weights: Mapping[str, float] | Objective) -> Objective:
    return weights if isinstance(weights, Objective) else Objective(dict(weights))


def _scored(name: str, family: str, param, coefficients, scores: Mapping[str, TaskScore], tw) -> Candidate:
    return Candidate(name, family, param, coefficients, {k: asdict(s) for k, s in scores.items()},
                     as_objective(tw).value(scores))


def _finals(search: FoldSearch, new_full: Candidate | None, config: CalibrationConfig,
            fingerprints: Mapping[str, Fingerprint], tw: Objective) -> list[Candidate]:
    """The `config.finalists` best screened candidates, re-scored on every sample (N as it is: `new_full`); a
    `minimax` objective also re-scores both endpoints and takes its floors from them."""
    picks = sorted(search.candidates, key=lambda c: (c.pruned, c.objective))[: config.finalists]
    if not tw.linear:
        picks += [c for c in search.candidates if c.family in ("keep", "new") and c not in picks]
    tw.floor, finals = None, []
    for cand in picks:
        if cand.coefficients is None:
            finals.append(new_full)
            continue
        search.move_to(torch.tensor(cand.coefficients, dtype=torch.float64))
        scores = score_tasks(search.model, fingerprints, config.batch_size)
        finals.append(_scored(cand.name, cand.family, cand.param, cand.coefficients, scores, tw))
    if not tw.linear:
        tw.anchor(*(next(c for c in finals if c.family == end) for end in ("keep", "new")))
        for cand in finals:
            cand.objective = tw.value(cand.scores)
    return finals


def search_loaded(
    model, deploy: Callable, n_layers: int, fingerprints: Mapping[str, Fingerprint], tw: Objective,
    profile: torch.Tensor | None, config: CalibrationConfig, from_base: bool, timings: dict[str, float],
    endpoints: Mapping[str, Mapping[str, TaskScore]] | None = None,
) -> tuple[Candidate, list[Candidate], list[Candidate]]:
    """The search on a working model that holds N: score N, `deploy(model)` (moves it to D in place and returns
    `(delta, layers)`), then every candidate `D + a_l * delta`. Shared by full models and LoRA adapters.

    With `config.screen_samples` the candidates are scored on that many samples per task and the best
    `config.finalists` again on all (N as it is, which the moved model cannot return to in the from-base form, is
    scored in full before `deploy`). `endpoints` (`{"keep": scores, "new": scores}`, from `endpoint_pass`) are D's
    and N's scores on every fingerprint, already measured: the search uses them instead of replaying both endpoints
    (not when screening, whose endpoints are scored on the screen).

    Returns:
        `(chosen, candidates, screened)`: the candidates scored in full and, when screening, every screened one;
        `timings` gains `score_new`, `delta`, `search` (and `finalists`).
    """
    t = time.perf_counter()
    screen = config.screen_samples
    search_fps = {k: fp.subset(screen) for k, fp in fingerprints.items()} if screen else fingerprints
    coefs = None if from_base else [1.0] * n_layers
    endpoints = None if screen else endpoints
    new_scores = endpoints["new"] if endpoints else score_tasks(model, search_fps, config.batch_size)
    new_cand = _scored("new", "new", None, coefs, new_scores, tw)
    new_full = None
    if screen and from_base:
        new_full = _scored("new", "new", None, None, score_tasks(model, fingerprints, config.batch_size), tw)
    timings["score_new"] = time.perf_counter() - t
    t = time.perf_counter()
    delta, layers = deploy(model)
    timings["delta"] = time.perf_counter() - t
    t = time.perf_counter()
    search = FoldSearch(model, delta, layers, n_layers, search_fps, tw, config.batch_size, prune=config.prune)
    del delta  # the search holds the only reference: released with it
    search.register(new_cand, None if from_base else torch.ones(n_layers, dtype=torch.float64))
    if endpoints:  # `search_fold`'s keep is then this one
        zeros = torch.zeros(n_layers, dtype=torch.float64)
        search.register(_scored("keep", "keep", 0.0, zeros.tolist(), endpoints["keep"], tw), zeros)
    chosen = search_fold(search, profile, config, n_layers)
    timings["search"] = time.perf_counter() - t
    if not screen:
        return chosen, search.candidates, []
    t = time.perf_counter()
    finals = _finals(search, new_full, config, fingerprints, tw)
    timings["finalists"] = time.perf_counter() - t
    return min(finals, key=lambda c: c.objective), finals, search.candidates


def fold_report(
    from_base: bool, inputs: list[Path], new_task: str | None, tw: Mapping[str, float] | Objective,
    profile: torch.Tensor | None, config: CalibrationConfig, found: tuple[Candidate, list[Candidate], list[Candidate]],
    timings: dict[str, float],
) -> dict:
    """The search's report: protocol, inputs, the objective (rule, weights, each task's information scale and
    floor where used), every candidate with its per-task scores, the chosen one (and, with screening, every screened
    candidate under `screened`)."""
    chosen, candidates, screened = found
    goal = as_objective(tw)
    logger.info("Calibrated fold chose %s (objective %.5f) of %d candidates in %.1fs", chosen.name,
                chosen.objective, len(candidates) + len(screened), timings["total"])
    report = {
        "protocol": "from-base" if from_base else "chain", "inputs": [str(p) for p in inputs], "new_task": new_task,
        "rule": goal.rule, "task_weights": dict(goal.weights), "scales": goal.scales, "floor": goal.floor,
        "profile": None if profile is None else profile.tolist(), "config": asdict(config),
        "candidates": [asdict(c) for c in candidates], "chosen": asdict(chosen), "timings": timings,
    }
    if screened:
        report["screened"] = [asdict(c) for c in screened]
    return report


def chosen_coefficients(chosen: Candidate) -> torch.Tensor | None:
    return torch.tensor(chosen.coefficients, dtype=torch.float64) if chosen.coefficients is not None else None


def calibrated_fold(
    deployed: str | Path,
    new: str | Path,
    fingerprints: Mapping[str, Fingerprint],
    new_task: str | None = None,
    parent: str | Path | None = None,
    profile: list[float] | torch.Tensor | None = None,
    layer_map: LayerMap | None = None,
    config: CalibrationConfig | None = None,
    weights: Mapping[str, float] | None = None,
    endpoints: Mapping[str, Mapping[str, TaskScore]] | None = None,
) -> CalibratedFold:
    """Search the fold of `new` into `deployed` that best keeps every task's fingerprint (module docstring).

    Args:
        deployed: the deployed model's folder (D).
        new: the new task model's folder (N).
        fingerprints: every folded task's fingerprint and the new task's, by task name.
        new_task: the new task's name (for `CalibrationConfig.new_task_weight`).
        parent: N's parent (the from-base protocol's base); `None` or D's folder for the chain protocol.
        profile: RECALL's per-layer weight of the newest model (`MergeReport.newest_weight`); `None` skips the
            profile family.
        layer_map: parameter name -> layer (default: from the loaded model).
        config: the search; defaults to `CalibrationConfig()`.
        weights: explicit objective weight per task (overrides equal weights and `new_task_weight`).
        endpoints: D's and N's scores on every fingerprint in `fingerprints`, when already measured
            (`endpoint_pass`); else the search replays both.

    Returns:
        A `CalibratedFold`: pass `[CheckpointReader(d) for d in fold.inputs]` and `fold.weights` to
        `fusion.fuse_checkpoints` to write the chosen model; `fold.report` lists every candidate with its per-task
        scores, the chosen one and the time spent.
    """
    config, t0 = config or CalibrationConfig(), time.perf_counter()
    deployed, new = Path(deployed), Path(new)
    parent = Path(parent) if parent is not None else deployed
    from_base = parent.resolve() != deployed.resolve()
    model = load_task_model(new, config.device)
    tw = build_objective(fingerprints, new_task, config, weights, model)
    layer_map = layer_map or LayerMap.from_model(model)
    n = layer_map.num_layers + 1
    profile = check_profile(profile, n)
    timings = {"load": time.perf_counter() - t0}
    found = search_loaded(
        model, lambda m: _delta_and_deploy(m, deployed, parent, layer_map), n, fingerprints, tw, profile, config,
        from_base, timings, endpoints)
    del model
    timings["total"] = time.perf_counter() - t0
    inputs = [parent, deployed, new] if from_base else [deployed, new]
    report = fold_report(from_base, inputs, new_task, tw, profile, config, found, timings)
    report["endpoints_scored"] = "in the search" if endpoints is None or config.screen_samples else "beforehand"
    return CalibratedFold(inputs, merge_weights(chosen_coefficients(found[0]), n, from_base), found[0], report)


def prompts_match(fp: Fingerprint, texts: list[str], tokenizer, max_length: int) -> bool:
    """Whether `fp`'s samples are the prompts of `texts`, in order, none longer than `max_length` tokens: each text,
    tokenized and cut to its row's prompt length, gives that row's prompt."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if len(texts) != fp.num_samples or int(fp.prompt_lengths.max()) > max_length:
        return False
    for i, text in enumerate(texts):
        n = int(fp.prompt_lengths[i])
        if list(tok(text, truncation=True, max_length=n)["input_ids"]) != fp.input_ids[i, :n].tolist():
            return False
    return True


def endpoint_pass(
    dirs: list[Path], texts: list[str], tokenizer, fingerprints: Mapping[str, Fingerprint], max_length: int,
    batch_size: int = 8, device: str = "cpu",
) -> tuple[list[torch.Tensor], dict[str, dict[str, TaskScore]]] | None:
    """RECALL's representations of `texts` under D and N (`dirs`) and both endpoints' scores on every fingerprint,
    from one replay per model (`score_and_represent`), when `texts` are the new task's fingerprint prompts
    (`prompts_match`); else `None`, and the caller computes the representations as usual.

    A calibrated merge replays both endpoints anyway; taking RECALL's representations from those passes saves the
    two forward passes of the representation step. Each prompt is pooled as the fingerprint keeps it (an LM's is cut
    `steps - 1` tokens shorter than the fingerprint's `max_length`).

    Returns:
        `([reps_D, reps_N], {"keep": D's scores, "new": N's scores})`, reps `[L+1, n, H]`.
    """
    new_task = load_fingerprint(dirs[-1] / FINGERPRINT_NAME).task
    fp = fingerprints.get(new_task)
    if len(dirs) != 2 or fp is None or not prompts_match(fp, texts, tokenizer, max_length):
        return None
    reps, scores = [], {}
    for end, d in zip(("keep", "new"), dirs):
        logger.info("Representations and %s's fingerprint scores: %s", end, d)
        model = load_task_model(d, device)
        try:
            scores[end], r = score_and_represent(model, fingerprints, new_task, batch_size)
        finally:
            del model
            gc.collect()
        reps.append(r)
    return reps, scores
