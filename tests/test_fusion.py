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


def test_chunked_streaming_fusion_equals_whole_tensor_formula(model_pair, tmp_path):
    from safetensors.torch import load_file

    from recall_hf.fusion import fuse_checkpoints
    from recall_hf.layers import LayerMap
    from recall_hf.safetensors_io import CheckpointReader

    a, b = model_pair["llama"]
    layer_map = LayerMap.from_pretrained(a)
    weights = torch.rand(layer_map.num_layers + 1, 2, generator=torch.Generator().manual_seed(0))
    for name, chunk in (("whole", 10**9), ("chunked", 7)):
        (tmp_path / name).mkdir()
        fuse_checkpoints(
            [CheckpointReader(a), CheckpointReader(b)],
            layer_map,
            weights,
            tmp_path / name,
            dtype="bfloat16",
            progress=False,
            chunk_elements=chunk,
        )
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    whole, chunked = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "chunked" / "model.safetensors"),
    )
    for key, t in chunked.items():
        layer = layer_map.layer_of(key)
        ref = (weights[layer, 0] * sa[key] + weights[layer, 1] * sb[key]).to(torch.bfloat16)
        assert t.dtype == torch.bfloat16 and torch.equal(t, whole[key]) and torch.allclose(t.float(), ref.float()), key
