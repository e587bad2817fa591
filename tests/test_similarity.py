from __future__ import annotations

import pytest
import torch

from recall_hf.similarity import SIMILARITIES, get_similarity, layer_similarities, median_bandwidth


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_identical_representations_score_one(name):
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    assert get_similarity(name)(x, x, median_bandwidth(x)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_similarity_drops_with_divergence(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=gen)
    noise = torch.randn(20, 8, generator=gen)
    fn = get_similarity(name)
    sigma = median_bandwidth(x)
    near, far = fn(x, x + 0.1 * noise, sigma), fn(x, x + 3.0 * noise, sigma)
    assert 0.0 <= far < near <= 1.0


def test_rbf_paired_matches_formula():
    x, y = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    sigma = 2.0
    expected = (torch.exp(torch.tensor(-1.0 / 8)) + torch.exp(torch.tensor(-4.0 / 8))) / 2
    assert get_similarity("rbf")(x, y, sigma) == pytest.approx(float(expected))


def test_median_bandwidth_is_median_pairwise_distance():
    pts = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 2, 3 (each twice)
    assert median_bandwidth(pts) == pytest.approx(2.0)


def test_unknown_similarity_lists_valid_names():
    with pytest.raises(ValueError, match="rbf.*") as err:
        get_similarity("nope")
    for name in SIMILARITIES:
        assert name in str(err.value)


def test_layer_similarities_shape_symmetry_diagonal():
    gen = torch.Generator().manual_seed(0)
    reps = [torch.randn(3, 6, 4, generator=gen) for _ in range(3)]
    sims = layer_similarities(reps, "rbf")
    assert sims.shape == (3, 3, 3)
    assert torch.allclose(sims, sims.transpose(1, 2))
    assert torch.allclose(torch.diagonal(sims, dim1=1, dim2=2), torch.ones(3, 3, dtype=sims.dtype))


def test_layer_similarities_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        layer_similarities([torch.zeros(2, 3, 4), torch.zeros(2, 4, 4)])
