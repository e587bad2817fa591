"""The merge pipeline's two stages (recall_hf.plan, recall_hf.merge): a plan that writes nothing, fusion that takes
its coefficients as an argument (where a calibrated fold plugs in), and the public in-memory entry point."""

from __future__ import annotations

import pytest
import torch
from conftest import PROBES
from safetensors.torch import load_file

from recall_hf import RecallConfig, execute_merge, merge_coefficients, prepare_merge, represent
from recall_hf.models import load_backbone, load_tokenizer

CONFIG = RecallConfig(tau=0.2, batch_size=4, max_length=32)


def test_plan_writes_nothing_and_execute_uses_its_coefficients(model_pair, tmp_path):
    a, b = model_pair["gpt2"]
    plan = prepare_merge([a, b], PROBES, tmp_path / "out", CONFIG, progress=False)
    assert not (tmp_path / "out").exists()
    assert plan.kind == "full" and plan.coefficients.shape == (5, 2) and plan.task_counts == [1, 1]
    torch.testing.assert_close(plan.coefficients.sum(-1), torch.ones(5, dtype=plan.coefficients.dtype))
    report = execute_merge(plan, progress=False)
    assert report.weights == plan.coefficients.tolist() and "planned_weights" not in report.stats
    assert {"validate", "representations", "hash_inputs", "fusion", "total"} <= set(report.timings)


def test_replaced_coefficients_are_the_ones_fused(model_pair, tmp_path):
    a, b = model_pair["gpt2"]
    plan = prepare_merge([a, b], PROBES, tmp_path / "out", CONFIG, progress=False)
    newest_only = torch.tensor([[0.0, 1.0]] * 5)
    report = execute_merge(plan, newest_only, progress=False)
    assert report.weights == newest_only.tolist() and report.stats["planned_weights"] == plan.coefficients.tolist()
    merged, newest = load_file(tmp_path / "out" / "model.safetensors"), load_file(b / "model.safetensors")
    for name, t in newest.items():
        torch.testing.assert_close(merged[name], t, msg=name)


@pytest.mark.parametrize(("coefficients", "message"), [
    (torch.ones(4, 2) / 2, "do not fit"),
    (torch.full((5, 2), float("nan")), "NaN"),
])
def test_bad_replacement_coefficients_are_refused(model_pair, tmp_path, coefficients, message):
    a, b = model_pair["gpt2"]
    plan = prepare_merge([a, b], PROBES, tmp_path / "out", CONFIG, progress=False)
    with pytest.raises(ValueError, match=message):
        execute_merge(plan, coefficients, progress=False)
    assert not (tmp_path / "out").exists()


def test_in_memory_entry_point_matches_the_plan(model_pair, tmp_path):
    """Loaded models + a tokenizer give the same similarities and coefficients as the directory pipeline."""
    a, b = model_pair["gpt2"]
    plan = prepare_merge([a, b], PROBES, tmp_path / "out", CONFIG, progress=False)
    tok = load_tokenizer(b)
    reps = [represent(load_backbone(d), tok, PROBES, CONFIG) for d in (a, b)]
    sims, coefficients = merge_coefficients(reps, CONFIG, [1, 1])
    torch.testing.assert_close(sims, plan.similarities)
    torch.testing.assert_close(coefficients, plan.coefficients)
    with pytest.raises(ValueError, match="NaN"):
        merge_coefficients([reps[0], torch.full_like(reps[1], float("nan"))], CONFIG)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_representations_keep_the_texts_order_whatever_the_batching(model_pair, arch):
    """Batches group texts by length; every text's row is still its own (as when each text is its own batch)."""
    _, b = model_pair[arch]
    model, tok = load_backbone(b), load_tokenizer(b)
    texts = sorted(PROBES, key=len, reverse=True)[:3] + ["short", "a much longer probe text than the short one"]
    one_by_one = torch.cat([represent(model, tok, [t], CONFIG) for t in texts], dim=1)
    torch.testing.assert_close(represent(model, tok, texts, CONFIG), one_by_one, atol=1e-5, rtol=1e-4)
