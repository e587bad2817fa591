from __future__ import annotations

import math

import pytest
import torch

from recall_hf.weights import layer_weights, normalize_depth_profile, target_distribution


def sims_two(values: list[float]) -> torch.Tensor:
    s = torch.ones(len(values), 2, 2, dtype=torch.float64)
    s[:, 0, 1] = s[:, 1, 0] = torch.tensor(values, dtype=torch.float64)
    return s


def test_weights_are_convex_per_layer():
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(5, 3, 3, generator=gen, dtype=torch.float64)
    sims = (raw + raw.transpose(1, 2)) / 2
    sims[:, range(3), range(3)] = 1.0
    for mode in ("continual", "multi"):
        w = layer_weights(sims, tau=0.3, mode=mode, task_counts=[3, 1, 1])
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(5, dtype=w.dtype))


def test_continual_softmax_matches_formula():
    sims = sims_two([1.0, 0.8, 0.2])
    w = layer_weights(sims, tau=0.5, task_counts=None)
    for layer, s in enumerate([1.0, 0.8, 0.2]):
        new = math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(s / 0.5))
        assert w[layer, 1].item() == pytest.approx(new)
    # Agreeing layers are even, diverging layers tilt to the newest model.
    assert w[0, 1] == pytest.approx(0.5) and w[0, 1] < w[1, 1] < w[2, 1]


def test_task_count_prior_gives_old_tasks_their_share():
    sims = sims_two([1.0, 0.5])
    w = layer_weights(sims, tau=0.5, task_counts=[3, 1])
    assert w[0, 0].item() == pytest.approx(0.75)  # agreeing layer -> running mean (3 of 4 tasks)
    assert w[1, 1] > w[0, 1]
    assert torch.equal(layer_weights(sims, 0.5, task_counts=[1, 1]), layer_weights(sims, 0.5, task_counts=None))


def test_small_tau_approaches_one_hot_on_diverging_layers():
    w = layer_weights(sims_two([0.5]), tau=0.01)
    assert w[0, 1].item() > 0.999


def test_multi_mode_uniform_when_models_agree():
    w = layer_weights(torch.ones(2, 3, 3, dtype=torch.float64), tau=0.5, mode="multi")
    assert torch.allclose(w, torch.full((2, 3), 1 / 3, dtype=w.dtype))


def test_normalize_depth_spans_even_to_full_tilt():
    scores = torch.tensor([[0.99, 1.0], [0.95, 1.0], [0.9, 1.0]], dtype=torch.float64)
    norm = normalize_depth_profile(scores)
    assert norm[:, 0].tolist() == pytest.approx([1.0, 5 / 9, 0.0])
    assert norm[:, 1].tolist() == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("bad", [dict(tau=0.0), dict(mode="nope"), dict(task_counts=[1, 1, 1])])
def test_bad_arguments_raise(bad):
    kwargs = dict(tau=0.5, mode="continual", task_counts=None) | bad
    with pytest.raises(ValueError):
        layer_weights(sims_two([0.9]), **kwargs)


def test_target_distribution():
    assert target_distribution(3, "continual").tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        target_distribution(1, "continual")


def test_model_carrying_no_task_gets_zero_weight():
    w = layer_weights(sims_two([1.0, 0.3]), tau=0.5, task_counts=[0, 1])
    assert torch.equal(w[:, 0], torch.zeros(2, dtype=w.dtype)) and torch.equal(w[:, 1], torch.ones(2, dtype=w.dtype))
    assert torch.isfinite(layer_weights(sims_two([0.3]), tau=0.5, task_counts=[0, 0])).all()
    with pytest.raises(ValueError, match=">= 0"):
        layer_weights(sims_two([0.3]), tau=0.5, task_counts=[-1, 1])


def test_task_vector_coefficients():
    from recall_hf.weights import task_vector_coefficients

    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    c = task_vector_coefficients(w, [3, 1])
    # Layer 0 agrees (weights proportional to counts): task arithmetic with lambda 1 for every task.
    assert c[0].tolist() == pytest.approx([1.0, 1.0])
    # Layer 1 leans to the new model: it keeps its whole task vector, the deployed model 1/3 of its share.
    assert c[1].tolist() == pytest.approx([1 / 3, 1.0])
    with pytest.raises(ValueError, match="task counts"):
        task_vector_coefficients(w, [1, 1, 1])
