"""Calibrated fold (SPEC 2.7): candidates scored on every task's fingerprint, endpoints always in, fusion writes it."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from conftest import PROBES, perturb

from recall_hf.calibrate import (
    CalibrationConfig,
    calibrated_fold,
    layer_groups,
    merge_weights,
    midpoints,
    profile_coefficients,
    task_weights,
)
from recall_hf.fingerprint import FingerprintConfig, compute_fingerprint, load_task_model, score_tasks
from recall_hf.fusion import fuse_checkpoints
from recall_hf.layers import LayerMap
from recall_hf.safetensors_io import CheckpointReader
from recall_hf.tiny import build_tiny_model

SMALL = FingerprintConfig(top_k=8, steps=3, max_length=32, batch_size=8)
OLD_TEXTS, NEW_TEXTS = PROBES[:3], PROBES[3:]
FAST = CalibrationConfig(alphas=(0.5,), scales=(1.0,))


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
    return sum(fold.report["task_weights"][t] * s.divergence for t, s in scores.items())


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
    assert midpoints([0.0, 0.5, 1.0], 0.5) == [0.25, 0.75]
    assert midpoints([0.0, 0.5, 1.0], 0.0) == [0.25]
    assert profile_coefficients(torch.tensor([0.2, 0.6]), 2.0).tolist() == pytest.approx([0.4, 1.0])


# ------------------------------------------------------------------------------------------------- chain protocol


def test_identical_models_every_candidate_scores_zero(chain, tmp_path):
    d, _, fps = chain
    same = shutil.copytree(d, tmp_path / "same")
    fold = calibrated_fold(d, same, {"old": fps["old"]}, config=FAST)
    objectives = [c["objective"] for c in fold.report["candidates"]]
    assert len(objectives) >= 4 and max(objectives) < 1e-8


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
    fold = calibrated_fold(d, n, fps, new_task="new", profile=profile, config=CalibrationConfig(layer_groups=2))
    cands = _by_name(fold)
    assert fold.chosen.objective <= min(cands["keep"]["objective"], cands["new"]["objective"])
    assert {"keep", "new", "constant:0.5", "profile:1", "profile:1.5"} <= set(cands)
    assert cands["profile:1"]["coefficients"] == pytest.approx(profile)
    assert any(c["family"] == "group" for c in cands.values())
    assert fold.report["protocol"] == "chain" and set(fold.report["timings"]) >= {"load", "search", "total"}
    for c in cands.values():
        assert set(c["scores"]) == {"old", "new"}
    assert fold.weights.sum(-1).tolist() == pytest.approx([1.0] * (layer_map.num_layers + 1))
    got = _fused_objective(fold, layer_map, tmp_path / "out", fps)
    assert got == pytest.approx(fold.chosen.objective, rel=1e-3, abs=1e-6)


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
