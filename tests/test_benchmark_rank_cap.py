"""`benchmarks/rank_cap.py`'s fold chain on a tiny Llama: the daemon's calls, capped and uncapped."""

from __future__ import annotations

import torch
from conftest import PROBES
from test_hub import make_adapter

from benchmarks.rank_cap import fold_chain, table
from recall_hf.tiny import build_tiny_model


def test_fold_chain_caps_the_rank_and_records_the_error(tmp_path):
    base = tmp_path / "base"
    build_tiny_model("llama", base, texts=PROBES, layers=2)
    adapters = [make_adapter(base, tmp_path / f"a{k}", seed=k, base_name=str(base)) for k in range(3)]
    texts = [PROBES] * 3
    uncapped = fold_chain(base, adapters, texts, None, tmp_path / "uncapped")
    stacked = fold_chain(base, adapters, texts, 12, tmp_path / "stacked")
    capped = fold_chain(base, adapters, texts, 4, tmp_path / "capped")
    assert uncapped["ranks"] == [4, 8, 12] and uncapped["max_rel_error"] == 0.0
    assert stacked["ranks"] == [4, 8, 12] and stacked["chain_max_rel_error"] == 0.0  # a cap at the stacked rank
    assert capped["ranks"] == [4, 4, 4] and 0.0 < capped["max_rel_error"] < 1.0
    assert capped["chain_max_rel_error"] >= capped["max_rel_error"]
    from safetensors.torch import load_file

    exact = load_file(uncapped["dir"] / "adapter_model.safetensors")
    same = load_file(stacked["dir"] / "adapter_model.safetensors")
    for key in exact:  # the SVD path at a cap >= the rank keeps the update B @ A (factors may be re-based)
        if "lora_A" in key:
            bkey = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(same[bkey] @ same[key], exact[bkey] @ exact[key], atol=1e-5, rtol=1e-4)


def test_table_averages_seeds():
    row = {"rank": 8, "max_rel_error": 0.2, "mean_rel_error": 0.1, "chain_max_rel_error": 0.3}
    results = {seed: {"individual": {"rank": 8, "acc": {"a": own, "b": 0.5}},
                      "cap 8": {**row, "acc": {"a": a, "b": 0.5}}} for seed, own, a in ((0, 1.0, 0.5), (1, 0.0, 0.7))}
    lines = table(results, ["a", "b"]).splitlines()
    assert lines[2] == "| individual | 0.500 | 0.500 | 0.500 | 8 | – | – |"
    assert lines[3] == "| cap 8 | 0.600 | 0.500 | 0.550 | 8 | 0.200 / 0.100 | 0.300 |"
