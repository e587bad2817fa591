"""Adapter merges against PEFT's own deltas: exact layer-wise sums, ranks, compression, heads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from lora.fixtures import (
    assert_deltas_close,
    assert_weights_vary,
    expected_deltas,
    load_base,
    lora_deltas,
    make_adapter,
    merge,
)

pytest_plugins = ["lora.fixtures"]


def test_equal_ranks_merge_is_the_layerwise_weighted_sum(bases, llama_adapters, tmp_path):
    dirs = [llama_adapters["a"], llama_adapters["b"]]
    report = merge(dirs, tmp_path / "m")
    assert report.kind == "adapter" and report.output_task_count == 2
    assert_weights_vary(report.weights)
    expected = expected_deltas(bases["llama"], dirs, report.weights)
    assert_deltas_close(lora_deltas(bases["llama"], tmp_path / "m"), expected)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {} and not cfg["use_rslora"]
    assert json.loads((tmp_path / "m" / "recall.json").read_text())["task_count"] == 2
    assert (tmp_path / "m" / "recall_report.json").is_file() and (tmp_path / "m" / "recall_weights.png").is_file()


def test_unequal_ranks_rslora_and_patterns(bases, llama_adapters, llama_unequal):
    out, report = llama_unequal
    dirs = [llama_adapters["a"], llama_adapters["c"]]
    assert_weights_vary(report.weights)
    assert_deltas_close(lora_deltas(bases["llama"], out), expected_deltas(bases["llama"], dirs, report.weights))
    cfg = json.loads((out / "adapter_config.json").read_text())
    # v_proj: 4 + 8; q_proj: 4 + 8 (layer 1: 4 + 6); o_proj: 8 (only in c).
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12
    assert cfg["rank_pattern"]["model.layers.1.self_attn.q_proj"] == 10
    assert cfg["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 8
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert report.stats["partial_modules"] == 4
    assert {"model.layers.2.self_attn.o_proj", "model.embed_tokens"} <= set(cfg["target_modules"])


def test_output_loads_and_runs_forward(bases, llama_unequal):
    out, _ = llama_unequal
    model = PeftModel.from_pretrained(load_base(bases["llama"]), out)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    logits = model(input_ids=ids).logits
    base_logits = load_base(bases["llama"])(input_ids=ids).logits
    assert logits.shape == base_logits.shape and torch.isfinite(logits).all()
    assert not torch.allclose(logits, base_logits)


def test_compression_error_reported_and_decreasing(bases, llama_adapters, llama_unequal, tmp_path):
    dirs = [llama_adapters["a"], llama_adapters["c"]]
    full_out, full_report = llama_unequal
    expected = lora_deltas(bases["llama"], full_out)
    errors = []
    for rank in (2, 6, 64):
        report = merge(dirs, tmp_path / f"r{rank}", max_rank=rank)
        assert report.weights == full_report.weights
        comp = report.stats["compression"]
        errors.append(comp["max_rel_error"])
        got = lora_deltas(bases["llama"], tmp_path / f"r{rank}")
        actual = {n: float(torch.linalg.norm(got[n] - expected[n]) / torch.linalg.norm(expected[n])) for n in expected}
        assert max(actual.values()) == pytest.approx(comp["max_rel_error"], rel=1e-3, abs=1e-5)
        assert sum(actual.values()) / len(actual) == pytest.approx(comp["mean_rel_error"], rel=1e-3, abs=1e-5)
        cfg = json.loads((tmp_path / f"r{rank}" / "adapter_config.json").read_text())
        assert cfg["r"] == min(rank, 12)
    assert errors[0] > errors[1] > errors[2] == 0.0


def test_bert_classifier_modules_to_save(bases, tmp_path):
    base = bases["bert"]
    kw = dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    dirs = [make_adapter(base, tmp_path / "a", 7, r=4, lora_alpha=8, **kw),
            make_adapter(base, tmp_path / "b", 8, r=4, lora_alpha=8, **kw)]
    report = merge(dirs, tmp_path / "m")
    assert_deltas_close(lora_deltas(base, tmp_path / "m"), expected_deltas(base, dirs, report.weights))
    head = report.weights[-1]
    assert 0.0 < head[-1] < 1.0
    merged = load_file(tmp_path / "m" / "adapter_model.safetensors")
    for key in ("base_model.model.classifier.weight", "base_model.model.classifier.bias"):
        parts = [load_file(d / "adapter_model.safetensors")[key] for d in dirs]
        assert not torch.allclose(parts[0], parts[1])
        torch.testing.assert_close(merged[key], head[0] * parts[0] + head[1] * parts[1], rtol=1e-5, atol=1e-6)
    model = PeftModel.from_pretrained(load_base(base), tmp_path / "m")
    logits = model(input_ids=torch.tensor([[2, 5, 6, 3]])).logits
    assert logits.shape == (1, 2)
    torch.testing.assert_close(model.base_model.model.classifier.modules_to_save["default"].weight,
                               merged["base_model.model.classifier.weight"])

    # A head present in only one of the adapters cannot be merged.
    headless = shutil.copytree(dirs[0], tmp_path / "headless")
    tensors = {k: v for k, v in load_file(headless / "adapter_model.safetensors").items() if "classifier" not in k}
    save_file(tensors, headless / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="only some of the adapters"):
        merge([headless, dirs[1]], tmp_path / "out")
    assert not (tmp_path / "out").exists()
