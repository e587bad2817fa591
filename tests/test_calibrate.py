"""Calibrated fold (SPEC 2.7): candidates scored on every task's fingerprint, endpoints always in, fusion writes it."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from conftest import PROBES, perturb

from recall_hf.calibrate import (
    CalibrationConfig,
    FoldSearch,
    Objective,
    calibrated_fold,
    layer_groups,
    merge_weights,
    minimax_regret,
    predicted_divergences,
    profile_coefficients,
    quadratic_at,
    refine_grid,
    search_fold,
    task_weights,
)
from recall_hf.fingerprint import (
    FingerprintConfig,
    TaskScore,
    compute_fingerprint,
    information_scale,
    load_task_model,
    score_tasks,
    score_tasks_bounded,
)
from recall_hf.fusion import fuse_checkpoints
from recall_hf.layers import LayerMap
from recall_hf.safetensors_io import CheckpointReader
from recall_hf.tiny import build_tiny_model

SMALL = FingerprintConfig(top_k=8, steps=3, max_length=32, batch_size=8)
OLD_TEXTS, NEW_TEXTS = PROBES[:3], PROBES[3:]
# The plain weighted mean of raw KLs, every candidate scored in full.
FAST = CalibrationConfig(alphas=(0.5,), scales=(1.0,), prune=False, rule="mean", normalize=False)


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _fingerprint(path, texts, task):
    model = load_task_model(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return compute_fingerprint(model, tok, texts, task, SMALL)


def _task_fingerprints(old, new):
    """The old task's fingerprint from model folder `old`, the new task's from `new` (different samples)."""
    return {"old": _fingerprint(old, OLD_TEXTS, "old"), "new": _fingerprint(new, NEW_TEXTS, "new")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Deployed llama D (the old task's model) and a new model N = D with every weight moved (it forgets)."""
    root = tmp_path_factory.mktemp("chain")
    model, tok = build_tiny_model("llama", texts=PROBES)
    d = _save(model, tok, root / "D")
    perturb(model, "", scale=0.3, seed=3)
    n = _save(model, tok, root / "N")
    return d, n, _task_fingerprints(d, n)


def _by_name(fold):
    return {c["name"]: c for c in fold.report["candidates"]}


def _fused_objective(fold, layer_map, out, fps):
    """Write the chosen fold with the streaming fusion and score the written model."""
    out.mkdir()
    fuse_checkpoints([CheckpointReader(p) for p in fold.inputs], layer_map, fold.weights.float(), out,
                     progress=False)
    shutil.copy(fold.inputs[-1] / "config.json", out / "config.json")
    scores = score_tasks(load_task_model(out), fps)
    r = fold.report
    return Objective(r["task_weights"], r["rule"], r["scales"], r["floor"]).value(scores)


# ------------------------------------------------------------------------------------------------- pure math


def test_task_weights_equal_by_default_and_new_task_share_settable():
    assert task_weights(["a", "b", "c"], "c") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert task_weights(["a", "b", "c"], "c", 0.5) == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5})
    assert task_weights(["a", "b"], "b", weights={"a": 3, "b": 1}) == pytest.approx({"a": 0.75, "b": 0.25})
    with pytest.raises(ValueError, match="every task"):
        task_weights(["a", "b"], "b", weights={"a": 1})
    with pytest.raises(ValueError, match="at least one task"):
        task_weights([], None)


def test_merge_weights_express_the_fold_over_the_input_folders():
    a = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert merge_weights(a, 3, from_base=False).tolist() == [[1.0, 0.0], [0.75, 0.25], [0.0, 1.0]]
    assert merge_weights(a, 3, from_base=True).tolist() == [[-0.0, 1.0, 0.0], [-0.25, 1.0, 0.25], [-1.0, 1.0, 1.0]]
    assert merge_weights(None, 2, from_base=True).tolist() == [[0.0, 0.0, 1.0]] * 2
    assert merge_weights(None, 2, from_base=False).tolist() == [[0.0, 1.0]] * 2
    with pytest.raises(ValueError, match="coefficients shape"):
        merge_weights(a, 4, from_base=False)


def test_grid_helpers():
    assert layer_groups(5, 2) == [[0, 1], [2, 3, 4]]
    assert layer_groups(2, 5) == [[0], [1]]
    assert profile_coefficients(torch.tensor([0.2, 0.6]), 2.0).tolist() == pytest.approx([0.4, 1.0])


def test_quadratic_model_helpers():
    points = {0.0: 1.0, 0.5: 0.25, 1.0: 0.0}  # (1 - a)^2
    assert quadratic_at(points, 0.25) == pytest.approx(0.5625) and quadratic_at(points, 0.875) == pytest.approx(1 / 64)
    assert quadratic_at({0.0: 0.0, 1.0: 2.0}, 0.25) == pytest.approx(0.5)  # a line through two
    assert quadratic_at({0.0: 3.0, 0.25: 1.0, 0.5: 0.0, 1.0: 7.0}, 0.125) == pytest.approx(1.875)  # nearest 3
    line = {0.0: {"a": 0.1, "b": 1.0}, 1.0: {"a": 1.1}}
    assert predicted_divergences(line, ["a"], 0.5) == {"a": pytest.approx(0.6)}
    assert predicted_divergences(line, ["a", "b"], 0.5) is None  # b was scored once (a pruned candidate): no model
    # a task whose own model is on the line (divergence 0 at a = 1) is least there with zero slope: c (1 - a)^2
    # between 1 and its nearest scored neighbour, the 3-point quadratic beyond it
    sigmoid = {0.0: {"new": 1.0}, 0.5: {"new": 0.6}, 1.0: {"new": 1e-15}}
    assert predicted_divergences(sigmoid, ["new"], 0.875)["new"] == pytest.approx(0.6 * 0.25 ** 2)
    assert predicted_divergences(sigmoid, ["new"], 0.25)["new"] == pytest.approx(quadratic_at(
        {0.0: 1.0, 0.5: 0.6, 1.0: 1e-15}, 0.25))
    assert predicted_divergences({0.0: {"a": 2.0}, 0.5: {"a": 0.05}, 1.0: {"a": 0.5}}, ["a"], 0.625)["a"] == 0.0
    assert refine_grid(1.0) == [i / 8 for i in range(9)] and refine_grid(0.3) == [0.0, 0.125, 0.25, 0.3]


class _Curve(torch.nn.Module):
    """One weight `w`, moved to `a` by the search; the old task's divergence is `9 a^2`, the new one's `(1 - a)^2`."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def scores(self, model, fingerprints):
        a = float(self.w)
        return {"old": TaskScore(9 * a * a, 0.0), "new": TaskScore((1 - a) ** 2, 0.0)}


@pytest.mark.parametrize("steps", [0, 2])
def test_refinement_scores_the_fold_the_quadratic_model_predicts(steps):
    curve = _Curve()
    fps = {t: type("Fp", (), {"lengths": torch.ones(1)})() for t in ("old", "new")}
    goal = Objective({"old": 0.5, "new": 0.5}, "minimax", {"old": 1.0, "new": 1.0})
    search = FoldSearch(curve, {"w": torch.ones(1, dtype=torch.float64)}, {"w": 0}, 1, fps, goal,
                        scorer=curve.scores)
    chosen = search_fold(search, None, CalibrationConfig(scales=(), refine_steps=steps), 1)
    names = [c.name for c in search.candidates]
    if steps == 0:
        assert names == ["keep", "new", "constant:0.5"] and chosen.name == "keep"  # 1 < 2.25 at 0.5
        return
    # both divergences are quadratics in a: the model through 0, 0.5, 1 is exact, so its one proposal is the best
    # point of the 1/8 grid (max(9 a^2, (1 - a)^2) is least at a = 0.25), and nothing then beats it
    assert names == ["keep", "new", "constant:0.5", "constant:0.25"] and chosen.name == "constant:0.25"
    assert chosen.predicted == pytest.approx(chosen.objective) == pytest.approx(0.5625)


# ------------------------------------------------------------------------------------------------- chain protocol


def test_identical_models_every_candidate_scores_zero(chain, tmp_path):
    d, _, fps = chain
    same = shutil.copytree(d, tmp_path / "same")
    fold = calibrated_fold(d, same, {"old": fps["old"]}, config=FAST)
    objectives = {c["name"]: c["objective"] for c in fold.report["candidates"]}
    assert max(objectives.values()) < 1e-8
    # keep, new, the grid's 0.5; the quadratic model predicts 0 everywhere, which cannot beat 0: nothing proposed
    assert set(objectives) == {"keep", "new", "constant:0.5"}


@pytest.mark.parametrize("weights, winner", [({"old": 1, "new": 0}, "keep"), ({"old": 0, "new": 1}, "new")])
def test_the_right_endpoint_wins_when_only_one_task_counts(chain, weights, winner):
    d, n, fps = chain
    fold = calibrated_fold(d, n, fps, new_task="new", config=FAST, weights=weights)
    assert fold.chosen.name == winner and fold.chosen.objective < 1e-8
    other = _by_name(fold)["new" if winner == "keep" else "keep"]
    assert other["objective"] > 1e-3
    assert fold.weights[:, 1].tolist() == [0.0 if winner == "keep" else 1.0] * fold.weights.shape[0]


def test_chosen_fold_never_worse_than_either_endpoint_and_fusion_writes_it(chain, tmp_path):
    d, n, fps = chain
    layer_map = LayerMap.from_pretrained(d)
    profile = [0.5] * (layer_map.num_layers + 1)
    profile[-1] = 0.9
    fold = calibrated_fold(d, n, fps, new_task="new", profile=profile,
                           config=CalibrationConfig(scales=(1.0, 1.5), layer_groups=2))
    cands = _by_name(fold)
    assert fold.chosen.objective <= min(cands["keep"]["objective"], cands["new"]["objective"])
    assert {"keep", "new", "constant:0.5", "profile:1", "profile:1.5"} <= set(cands)
    assert cands["profile:1"]["coefficients"] == pytest.approx(profile)
    assert any(c["family"] == "group" for c in cands.values())
    assert fold.report["protocol"] == "chain" and set(fold.report["timings"]) >= {"load", "search", "total"}
    for c in cands.values():  # a pruned candidate (stopped once it could not win) keeps the tasks it finished
        assert set(c["scores"]) <= {"old", "new"} if c["pruned"] else set(c["scores"]) == {"old", "new"}
    assert fold.weights.sum(-1).tolist() == pytest.approx([1.0] * (layer_map.num_layers + 1))
    got = _fused_objective(fold, layer_map, tmp_path / "out", fps)
    assert got == pytest.approx(fold.chosen.objective, rel=1e-3, abs=1e-6)


def test_normalized_objective_divides_each_task_by_its_information_scale(chain):
    d, n, fps = chain
    plain = calibrated_fold(d, n, fps, new_task="new", config=FAST)
    fold = calibrated_fold(d, n, fps, new_task="new", config=CalibrationConfig(alphas=(0.5,), scales=(1.0,),
                                                                               prune=False, rule="mean"))
    vocab = load_task_model(d).lm_head.weight.shape[0]
    scales = {t: information_scale(fp, vocab) for t, fp in fps.items()}
    assert fold.report["scales"] == pytest.approx(scales) and plain.report["scales"] is None
    assert fold.report["task_weights"] == pytest.approx({t: 0.5 / scales[t] for t in fps})
    plain_by_name = _by_name(plain)
    shared = set(_by_name(fold)) & set(plain_by_name)  # the quadratic model's proposals may differ
    assert {"keep", "new", "constant:0.5"} <= shared
    for name, c in _by_name(fold).items():  # the same replays, weighed by 1 / scale
        if name in shared:
            assert c["scores"] == plain_by_name[name]["scores"]
        expected = sum(0.5 * c["scores"][t]["divergence"] / scales[t] for t in fps)
        assert c["objective"] == pytest.approx(expected, rel=1e-9)
    assert fold.chosen.objective == min(c["objective"] for c in fold.report["candidates"])


def test_minimax_regret_is_the_largest_weighted_share_lost_beyond_the_better_endpoint():
    floor, scales = {"a": 0.1, "b": 0.0}, {"a": 0.5, "b": 2.0}
    assert minimax_regret({"a": 0.3, "b": 0.4}, floor, scales, {"a": 1, "b": 1}) == pytest.approx(0.4)  # 0.2/0.5
    assert minimax_regret({"a": 0.3, "b": 1.2}, floor, scales, {"a": 1, "b": 1}) == pytest.approx(0.6)  # 1.2/2
    assert minimax_regret({"a": 0.3, "b": 1.2}, floor, scales, {"a": 1, "b": 0.5}) == pytest.approx(0.4)
    assert minimax_regret({"a": 0.05, "b": 0.0}, floor, scales, {"a": 1, "b": 1}) == 0.0  # better than both ends


def _head_pair(tmp_path):
    """D and N differing only in the output head (rows moved at random): KL along `D + a (N - D)` is smooth, so a
    middle fold keeps both tasks better than either endpoint keeps the other's."""
    model, tok = build_tiny_model("llama", texts=PROBES)
    folders = []
    for name, seed in (("D", 1), ("N", 2)):
        m = load_task_model(_save(model, tok, tmp_path / "base")) if not folders else load_task_model(folders[0])
        with torch.no_grad():
            m.lm_head.weight.add_(torch.randn(m.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed)))
        folders.append(_save(m, tok, tmp_path / name))
    return folders[0], folders[1], _task_fingerprints(folders[0], folders[1])


def test_minimax_rule_costs_each_candidate_by_its_worst_task(tmp_path):
    d, n, fps = _head_pair(tmp_path)
    config = CalibrationConfig(alphas=(0.25, 0.5, 0.75), scales=(), rule="minimax", prune=False)
    fold = calibrated_fold(d, n, fps, new_task="new", config=config)
    report, cands = fold.report, _by_name(fold)
    assert report["rule"] == "minimax" and not any(c["pruned"] for c in cands.values())
    vocab = load_task_model(d).lm_head.weight.shape[0]
    scales = {t: information_scale(fp, vocab) for t, fp in fps.items()}
    div = {name: {t: c["scores"][t]["divergence"] for t in fps} for name, c in cands.items()}
    floor = {t: min(div["keep"][t], div["new"][t]) for t in fps}
    assert report["floor"] == pytest.approx(floor) and report["scales"] == pytest.approx(scales)
    for name, c in cands.items():
        assert c["objective"] == pytest.approx(max((div[name][t] - floor[t]) / scales[t] for t in fps), abs=1e-12)
    assert fold.chosen.name not in ("keep", "new")  # each endpoint leaves one task with all it could lose
    assert fold.chosen.objective == min(c["objective"] for c in cands.values())
    assert fold.chosen.objective < min(cands["keep"]["objective"], cands["new"]["objective"])


@pytest.mark.parametrize("weights, winner", [({"old": 1, "new": 0}, "keep"), ({"old": 0, "new": 1}, "new")])
def test_minimax_takes_the_endpoint_of_the_only_task_that_counts(chain, weights, winner):
    d, n, fps = chain
    fold = calibrated_fold(d, n, fps, new_task="new", weights=weights,
                           config=CalibrationConfig(alphas=(0.5,), scales=(), rule="minimax"))
    assert fold.chosen.name == winner and fold.chosen.objective == 0.0


def test_calibration_config_refuses_bad_rules():
    with pytest.raises(ValueError, match="rule must be one of"):
        CalibrationConfig(rule="median")


def test_a_bad_profile_is_refused(chain):
    d, n, fps = chain
    with pytest.raises(ValueError, match="profile must hold"):
        calibrated_fold(d, n, fps, profile=[0.5, 0.5], config=FAST)


# ------------------------------------------------------------------------------------------------- from-base protocol


def test_from_base_fold_adds_two_disjoint_task_vectors_and_beats_both_endpoints(tmp_path):
    model, tok = build_tiny_model("llama", texts=PROBES)
    base = _save(model, tok, tmp_path / "base")
    vocab = model.lm_head.weight.shape[0]
    # Each task moves its own half of the output rows: the logits are linear in them, so the vectors add up.
    for name, rows, seed in (("D", slice(0, vocab // 2), 1), ("N", slice(vocab // 2, vocab), 2)):
        m = load_task_model(base)
        with torch.no_grad():
            w = m.lm_head.weight
            w[rows] += torch.randn(w[rows].shape, generator=torch.Generator().manual_seed(seed))
        _save(m, tok, tmp_path / name)
    fps = _task_fingerprints(tmp_path / "D", tmp_path / "N")
    fold = calibrated_fold(tmp_path / "D", tmp_path / "N", fps, new_task="new", parent=base, config=FAST)
    cands = _by_name(fold)
    assert fold.report["protocol"] == "from-base" and cands["new"]["coefficients"] is None
    assert fold.inputs == [base, tmp_path / "D", tmp_path / "N"]
    # Task arithmetic (a = 1) keeps both tasks far better than keeping D or taking N.
    assert fold.chosen.name == "constant:1"
    assert fold.chosen.objective < 0.5 * min(cands["keep"]["objective"], cands["new"]["objective"])
    assert fold.weights[0].tolist() == [-1.0, 1.0, 1.0]
    got = _fused_objective(fold, LayerMap.from_pretrained(base), tmp_path / "out", fps)
    assert got == pytest.approx(fold.chosen.objective, rel=1e-3, abs=1e-6)


def test_classifier_fold_scores_head_logits(tmp_path):
    model, tok = build_tiny_model("bert", texts=PROBES)
    d = _save(model, tok, tmp_path / "D")
    perturb(model, "", scale=0.2, seed=5)
    n = _save(model, tok, tmp_path / "N")
    fps = _task_fingerprints(d, n)
    assert fps["old"].kind == "classifier"
    fold = calibrated_fold(d, n, fps, new_task="new", config=FAST)
    cands = _by_name(fold)
    assert cands["keep"]["scores"]["old"]["divergence"] < 1e-8 < cands["keep"]["scores"]["new"]["divergence"]
    assert fold.chosen.objective <= min(cands["keep"]["objective"], cands["new"]["objective"])


def test_tied_embeddings_fold_and_fusion_agree(tmp_path):
    model, tok = build_tiny_model("qwen2", texts=PROBES)  # tie_word_embeddings: lm_head is the embedding
    d = _save(model, tok, tmp_path / "D")
    perturb(model, "", scale=0.2, seed=7)
    n = _save(model, tok, tmp_path / "N")
    fps = _task_fingerprints(d, n)
    fold = calibrated_fold(d, n, fps, new_task="new", config=FAST)
    cands = _by_name(fold)
    assert fold.chosen.objective <= min(cands["keep"]["objective"], cands["new"]["objective"])
    got = _fused_objective(fold, LayerMap.from_pretrained(d), tmp_path / "out", fps)
    assert got == pytest.approx(fold.chosen.objective, rel=1e-3, abs=1e-6)


# ------------------------------------------------------------------------------------------------- screening


def test_fingerprint_subset_spreads_samples_evenly(chain):
    _, _, fps = chain
    fp = fps["new"]
    sub = fp.subset(2)
    assert sub.num_samples == 2 and torch.equal(sub.input_ids, fp.input_ids[[0, fp.num_samples - 1]])
    assert torch.equal(sub.topk_logprobs, fp.topk_logprobs[[0, fp.num_samples - 1]])
    assert fp.subset(fp.num_samples + 5) is fp


@pytest.mark.parametrize("from_base, rule", [(False, "mean"), (True, "mean"), (False, "minimax"), (True, "minimax")])
def test_screened_search_rescores_finalists_on_every_sample(chain, tmp_path, from_base, rule):
    d, n, fps = chain
    parent = None
    if from_base:  # a from-base fold of the same two models: N's parent is a third folder
        parent = shutil.copytree(d, tmp_path / "P")
    grid = {"alphas": (0.5,), "scales": (1.0,), "rule": rule}
    full = calibrated_fold(d, n, fps, new_task="new", parent=parent, config=CalibrationConfig(**grid, prune=False))
    fast = calibrated_fold(d, n, fps, new_task="new", parent=parent,
                           config=CalibrationConfig(**grid, screen_samples=1, finalists=2))
    screened, finals = fast.report["screened"], fast.report["candidates"]
    fixed = {"keep", "new", "constant:0.5", "constant:1", "profile:1"} & {c["name"] for c in full.report["candidates"]}
    assert fixed <= {c["name"] for c in screened}  # the quadratic model's proposals may differ between the two
    names = {c["name"] for c in finals}
    # minimax's floors come from both endpoints on every sample: they are finalists too
    assert len(finals) == 2 if rule == "mean" else ({"keep", "new"} <= names and 2 <= len(finals) <= 4)
    if rule == "minimax":
        assert fast.report["floor"] == pytest.approx(full.report["floor"], abs=1e-9)  # N moved in place: float noise
    assert {c["name"] for c in finals} <= {c["name"] for c in screened}
    by_name = _by_name(full)
    for c in finals:  # the finalists' scores are the full search's scores of the same candidates
        # rel 1e-5: the working model moves in place, and the two searches visit other folds on the way
        assert c["objective"] == pytest.approx(by_name[c["name"]]["objective"], rel=1e-5, abs=1e-9)
    assert fast.chosen.objective == min(c["objective"] for c in finals)
    assert any(c["objective"] != pytest.approx(by_name[c["name"]]["objective"]) for c in screened)


# ------------------------------------------------------------------------------------------------- pruning


def test_bounded_scores_are_the_plain_scores_or_a_lower_bound(chain):
    d, _, fps = chain
    model, weights = load_task_model(d), {"old": 0.5, "new": 0.5}
    full = score_tasks(model, fps)
    scores, value, complete = score_tasks_bounded(model, fps, weights, float("inf"), order=["new", "old"])
    assert complete and scores == full and value == pytest.approx(sum(0.5 * s.divergence for s in full.values()))
    scores, low, complete = score_tasks_bounded(model, fps, weights, 0.0, batch_size=2, order=["new", "old"])
    assert not complete and scores == {} and 0 < low < value


@pytest.mark.parametrize("from_base, rule", [(False, "mean"), (True, "mean"), (False, "minimax"), (True, "minimax")])
def test_pruning_keeps_the_choice_and_every_full_score(chain, tmp_path, from_base, rule):
    d, n, fps = chain
    parent = shutil.copytree(d, tmp_path / "P") if from_base else None
    n_layers = LayerMap.from_pretrained(d).num_layers + 1
    profile = [0.2 + 0.8 * i / (n_layers - 1) for i in range(n_layers)]
    runs = {prune: calibrated_fold(d, n, fps, new_task="new", parent=parent, profile=profile,
                                   config=CalibrationConfig(prune=prune, layer_groups=2, rule=rule))
            for prune in (False, True)}
    plain, pruned = (_by_name(runs[p]) for p in (False, True))
    assert runs[True].chosen.name == runs[False].chosen.name and torch.equal(runs[True].weights, runs[False].weights)
    assert list(pruned) == list(plain)  # the same candidates, in the same order
    stopped = [name for name, c in pruned.items() if c["pruned"]]
    assert stopped, "the constructed case must prune something"
    for name, c in pruned.items():
        if c["pruned"]:
            assert runs[False].chosen.objective < c["objective"] <= plain[name]["objective"] * (1 + 1e-9)
        else:
            assert c["objective"] == plain[name]["objective"] and c["scores"] == plain[name]["scores"]


def test_endpoints_are_never_pruned(chain):
    """The daemon's fingerprint gate compares the chosen fold with `keep` on every task: both endpoints stay full."""
    d, n, fps = chain
    profile = [0.5] * (LayerMap.from_pretrained(d).num_layers + 1)  # profile folds: prunable (the line is not)
    fold = calibrated_fold(d, n, fps, new_task="new", profile=profile, config=CalibrationConfig(scales=(0.5, 1.0)),
                           weights={"old": 0, "new": 1})
    cands = _by_name(fold)
    assert fold.chosen.name == "new" and any(c["pruned"] for c in cands.values())
    for name in ("keep", "new"):
        assert not cands[name]["pruned"] and set(cands[name]["scores"]) == {"old", "new"}
