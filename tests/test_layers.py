from __future__ import annotations

import pytest
from torch import nn

from recall_hf.layers import LayerMap, find_blocks
from recall_hf.tiny import tiny_config

EXPECTED = {
    # arch: (blocks, a layer-0 name, a block-2 name -> 3, a layer-L name)
    "llama": ("model.layers", "model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight", "model.norm.weight"),
    "qwen2": ("model.layers", "model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.bias", "lm_head.weight"),
    "gpt2": ("transformer.h", "transformer.wpe.weight", "transformer.h.2.attn.c_attn.weight", "transformer.ln_f.bias"),
    "bert": (
        "bert.encoder.layer",
        "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.2.output.dense.weight",
        "classifier.weight",
    ),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_layer_map_from_module_tree(arch):
    blocks, first, block2, last = EXPECTED[arch]
    lm = LayerMap.from_config(tiny_config(arch, vocab_size=64))
    assert lm.blocks == blocks and lm.num_layers == 4
    assert lm.layer_of(first) == 0
    assert lm.layer_of(block2) == 3
    assert lm.layer_of(last) == 4
    assert lm.layer_of("base_model.model." + block2.rsplit(".", 1)[0]) == 3  # PEFT-wrapped module name


def test_unknown_parameter_is_refused():
    lm = LayerMap.from_config(tiny_config("llama", vocab_size=64))
    with pytest.raises(ValueError, match="not_a_param"):
        lm.layer_of("not_a_param.weight")


def test_ambiguous_block_lists_are_refused():
    model = nn.Module()
    model.a, model.b = nn.ModuleList([nn.Linear(2, 2)] * 2), nn.ModuleList([nn.Linear(2, 2)] * 2)
    with pytest.raises(ValueError, match="exactly one ModuleList"):
        find_blocks(model, 2)


def test_nested_lists_pick_the_outermost():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]) for _ in range(2)])
    assert find_blocks(model, 2) == "blocks"
