"""Folding an adapter into full weights equals base + its delta (recall_hf.lora.fold)."""

from __future__ import annotations

import json

import torch
import transformers

from lora import fixtures as fx
from recall_hf.lora.fold import fold_adapter

pytest_plugins = ["lora.fixtures"]


def test_fold_adapter_equals_base_plus_merged_delta(bases, llama_unequal, tmp_path):
    out, report = llama_unequal
    folded = fold_adapter(out, tmp_path / "folded")
    assert folded == tmp_path / "folded" and not (folded / "adapter_config.json").exists()
    assert json.loads((folded / "recall.json").read_text())["task_count"] == report.output_task_count
    model = transformers.AutoModelForCausalLM.from_pretrained(folded)
    base = fx.load_base(bases["llama"]).state_dict()
    state = model.state_dict()
    merged_deltas = fx.lora_deltas(bases["llama"], out)
    deltas = {n.removeprefix("base_model.model.") + ".weight": d for n, d in merged_deltas.items()}
    for name, tensor in base.items():
        torch.testing.assert_close(state[name], tensor + deltas.get(name, 0), rtol=1e-4, atol=1e-5, msg=name)
    assert transformers.AutoTokenizer.from_pretrained(folded)("the movie")["input_ids"]


def test_gpt2_conv1d_merge_and_fold(bases, tmp_path):
    base = bases["gpt2"]
    kw = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    dirs = [fx.make_adapter(base, tmp_path / "a", 5, r=4, lora_alpha=8, **kw),
            fx.make_adapter(base, tmp_path / "b", 6, r=8, lora_alpha=8, **kw)]
    # k=3 < 6 probe texts: the newest adapter's typical samples are selected first.
    report = fx.merge(dirs, tmp_path / "m", k=3)
    assert len(report.probes) == 3 and set(report.probes) <= set(fx.TEXTS)
    fx.assert_weights_vary(report.weights)
    expected = fx.expected_deltas(base, dirs, report.weights)
    fx.assert_deltas_close(fx.lora_deltas(base, tmp_path / "m"), expected)
    folded = transformers.AutoModelForCausalLM.from_pretrained(fold_adapter(tmp_path / "m", tmp_path / "f"))
    base_state, state = fx.load_base(base).state_dict(), folded.state_dict()
    name = "base_model.model.transformer.h.2.attn.c_attn"
    assert base_state["transformer.h.2.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
    torch.testing.assert_close(state["transformer.h.2.attn.c_attn.weight"],
                               base_state["transformer.h.2.attn.c_attn.weight"] + expected[name], rtol=1e-4, atol=1e-5)
