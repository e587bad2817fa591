from __future__ import annotations

import pytest
import torch

from recall_hf.fusion import fuse_tensor


def test_fuse_tensor_is_weighted_sum_in_fp32():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([3.0, 5.0], dtype=torch.float16)
    out = fuse_tensor([a, b], torch.tensor([0.25, 0.75]))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 5]))


def test_fuse_tensor_aborts_on_nan_naming_tensor():
    a = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="layers.3.mlp"):
        fuse_tensor([a, torch.zeros(2)], torch.tensor([0.5, 0.5]), "layers.3.mlp")


def test_fuse_tensor_rejects_shape_and_count_mismatch():
    with pytest.raises(ValueError, match="shape"):
        fuse_tensor([torch.zeros(2), torch.zeros(3)], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="weights"):
        fuse_tensor([torch.zeros(2)], torch.tensor([0.5, 0.5]))
