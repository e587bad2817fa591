"""LoRA merge math on hand-made tensors: scale, exact stacking, optimal compression (recall_hf.lora.math)."""

from __future__ import annotations

import pytest
import torch

from recall_hf.lora.math import compress_lora, lora_scale, stack_lora


def test_lora_scale():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="r=0"):
        lora_scale(8, 0)
    with pytest.raises(ValueError, match="lora_alpha"):
        lora_scale(float("nan"), 4)


def test_stack_lora_is_exact_for_unequal_ranks():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(2, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]
    Bs = [torch.randn(6, 2, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)]
    scales, weights = [2.0, 0.5, 1.5], [0.2, 0.3, 0.5]
    A, B = stack_lora(As, Bs, scales, weights)
    assert A.shape == (10, 7) and B.shape == (6, 10)
    expected = sum(w * s * b @ a for a, b, s, w in zip(As, Bs, scales, weights))
    torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="in=7"):
        stack_lora([As[0], torch.randn(2, 8)], [Bs[0], torch.randn(6, 2)], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="equally many"):
        stack_lora(As, Bs, scales, weights[:2])


def test_compress_lora_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(12, 20, generator=g), torch.randn(16, 12, generator=g)
    full = B @ A
    U, S, Vh = torch.linalg.svd(full.double())
    errors = []
    for k in (1, 4, 8, 11):
        A_k, B_k, err = compress_lora(A, B, k)
        assert A_k.shape == (k, 20) and B_k.shape == (16, k)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        torch.testing.assert_close((B_k @ A_k).double(), best, rtol=1e-4, atol=1e-4)
        true_err = float(torch.linalg.norm(full.double() - best) / torch.linalg.norm(full.double()))
        assert err == pytest.approx(true_err, rel=1e-6, abs=1e-9)
        errors.append(err)
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    same_A, same_B, err = compress_lora(A, B, 12)
    assert err == 0.0 and same_A is A and same_B is B
    with pytest.raises(ValueError, match="max_rank"):
        compress_lora(A, B, 0)


# Fixtures: tiny bases and LoRA adapters with perturbed factors.


def test_merge_factors_drops_zero_factors_from_the_stack():
    """A zero adapter (B = 0) or a factor at coefficient 0 adds no rank: r 4 + 4 (+ 4 zero) stays 8, not 12."""
    from recall_hf.lora.math import merge_factors

    gen = torch.Generator().manual_seed(3)
    live = (torch.randn(4, 8, generator=gen), torch.randn(6, 4, generator=gen))
    zero = (torch.randn(4, 8, generator=gen), torch.zeros(6, 4))
    new = (torch.randn(4, 8, generator=gen), torch.randn(6, 4, generator=gen))
    A, B, err = merge_factors([zero, live, new], [2.0, 1.0, 0.5], [0.3, 0.3, 0.4], None)
    assert A.shape == (8, 8) and B.shape == (6, 8) and err == 0.0
    expected = 0.3 * 1.0 * live[1] @ live[0] + 0.4 * 0.5 * new[1] @ new[0]
    torch.testing.assert_close(B @ A, expected)
    A, B, _ = merge_factors([live, new], [1.0, 0.5], [0.0, 1.0], None)  # weight 0: dropped
    assert A.shape[0] == 4
    torch.testing.assert_close(B @ A, 0.5 * new[1] @ new[0])
    A, B, _ = merge_factors([zero, live], [2.0, 1.0], [1.0, 0.0], None)  # nothing contributes: one zero factor
    assert A.shape == (1, 8) and B.shape == (6, 1) and not B.any()
