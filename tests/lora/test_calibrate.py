"""The calibrated fold of LoRA adapters (SPEC 2.7): dense deltas as PEFT applies them, both forms, the right endpoint,
and the written adapter scoring like the chosen candidate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROBES
from peft import PeftModel

from lora.fixtures import load_base, lora_deltas, make_adapter
from recall_hf.calibrate import CalibrationConfig, Objective
from recall_hf.cli import main
from recall_hf.config import RecallConfig
from recall_hf.fingerprint import FINGERPRINTS_DIR, FingerprintConfig, read_fingerprints, score_tasks
from recall_hf.lora.calibrate import adapter_deltas, adapter_fold, check_calibrate_adapters, full_tensor_bases
from recall_hf.lora.compat import load_adapter
from recall_hf.merge import recall_merge
from recall_hf.task_checkpoint import make_task_checkpoint

pytest_plugins = ["lora.fixtures"]

SMALL = FingerprintConfig(top_k=8, steps=3, max_length=32, batch_size=8)
OLD_TEXTS, NEW_TEXTS = PROBES[:3], PROBES[3:]
FAST = CalibrationConfig(alphas=(0.5,), scales=(1.0,), prune=False)  # every candidate scored in full
LORA = dict(task_type="CAUSAL_LM", lora_dropout=0.0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _checkpoint(adapter, texts, task):
    return make_task_checkpoint(adapter, texts, task=task, config=RecallConfig(k=3, max_candidates=9),
                                fingerprint_config=SMALL)


@pytest.fixture(scope="module")
def pair(bases, tmp_path_factory):
    """Adapter task checkpoints on the llama base: OLD (a small update) and NEW (a large one that moves OLD's task)."""
    root = tmp_path_factory.mktemp("lora_calibrate")
    old = make_adapter(bases["llama"], root / "OLD", 11, **LORA)
    new = make_adapter(bases["llama"], root / "NEW", 12, **{**LORA, "lora_alpha": 64})
    return bases["llama"], _checkpoint(old, OLD_TEXTS, "old"), _checkpoint(new, NEW_TEXTS, "new")


def _fold(base, d, n, fps, **kw):
    return adapter_fold(load_base(base), load_adapter(d), load_adapter(n), fps, new_task="new", config=FAST, **kw)


def _by_name(fold):
    return {c["name"]: c for c in fold.report["candidates"]}


def _report_objective(cal: dict, scores) -> float:
    """The objective the search reported (rule, weights, scales, floors) applied to `scores`."""
    return Objective(cal["task_weights"], cal["rule"], cal["scales"], cal["floor"]).value(scores)


def _peft_objective(base, adapter_dir, fps, cal):
    """The fingerprint objective of a written adapter, replayed through PEFT itself."""
    return _report_objective(cal, score_tasks(PeftModel.from_pretrained(load_base(base), adapter_dir).eval(), fps))


@pytest.mark.parametrize("arch, kwargs", [
    ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"], use_rslora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"])),  # Conv1D: PEFT transposes (fan_in_fan_out)
])
def test_dense_deltas_are_the_updates_peft_applies(bases, tmp_path, arch, kwargs):
    adapter = make_adapter(bases[arch], tmp_path / "a", 5, task_type="CAUSAL_LM", r=4, lora_alpha=8, **kwargs)
    model, adapter_ = load_base(bases[arch]), load_adapter(adapter)
    got = adapter_deltas(model, adapter_, full_tensor_bases(model, [adapter_]))
    peft_deltas = lora_deltas(bases[arch], adapter)
    expected = {k.removeprefix("base_model.model.") + ".weight": v for k, v in peft_deltas.items()}
    assert sorted(got) == sorted(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, rtol=1e-4, atol=1e-6, msg=name)


def test_identical_adapters_every_candidate_scores_zero(pair, tmp_path):
    base, old, _ = pair
    same = shutil.copytree(old, tmp_path / "same")
    fps = read_fingerprints(old)
    fold = _fold(base, old, same, fps)
    objectives = {c["name"]: c["objective"] for c in fold.report["candidates"]}
    assert max(objectives.values()) < 1e-8
    assert {"keep", "new", "constant:0.5"} <= set(objectives)  # a prediction of 0 cannot beat 0: nothing proposed


@pytest.mark.parametrize("weights, winner", [({"old": 1, "new": 0}, "keep"), ({"old": 0, "new": 1}, "new")])
def test_the_right_endpoint_wins_when_only_one_task_counts(pair, weights, winner):
    base, old, new = pair
    fps = {**read_fingerprints(old), **read_fingerprints(new)}
    fold = _fold(base, old, new, fps, weights=weights)
    assert fold.chosen.name == winner and fold.chosen.objective < 1e-8
    assert _by_name(fold)["new" if winner == "keep" else "keep"]["objective"] > 1e-3
    assert fold.weights[:, 1].tolist() == [0.0 if winner == "keep" else 1.0] * fold.weights.shape[0]


def test_calibrated_adapter_merge_writes_the_chosen_candidate(pair, tmp_path):
    base, old, new = pair
    report = recall_merge([old, new], None, tmp_path / "o", RecallConfig(k=3, calibrate=True), progress=False)
    cal, cands = report.calibration, {c["name"]: c for c in report.calibration["candidates"]}
    assert cal["protocol"] == "chain" and cal["inputs"] == [str(old), str(new)]
    assert cal["chosen"]["objective"] <= min(cands["keep"]["objective"], cands["new"]["objective"])
    assert {"keep", "new", "constant:0.5", "profile:1"} <= set(cands)
    a = torch.tensor(cal["chosen"]["coefficients"], dtype=torch.float64)
    assert torch.allclose(torch.tensor(report.stats["fusion_weights"], dtype=torch.float64),
                          torch.stack([1 - a, a], -1), rtol=0, atol=1e-12)
    assert sorted(read_fingerprints(tmp_path / "o")) == ["new", "old"] == report.stats["fingerprints"]
    fps = {**read_fingerprints(old), **read_fingerprints(new)}
    got = _peft_objective(base, tmp_path / "o", fps, cal)
    assert got == pytest.approx(cal["chosen"]["objective"], rel=1e-3, abs=1e-6)


def test_from_base_form_and_rank_cap(pair, tmp_path):
    base, old, new = pair
    config = RecallConfig(k=3, calibrate=True, max_rank=2)
    report = recall_merge([old, new], None, tmp_path / "o", config, base=base, progress=False)
    cal = report.calibration
    assert cal["protocol"] == "from-base" and _by_name_report(cal)["new"]["coefficients"] is None
    chosen = cal["chosen"]["coefficients"]
    expected = [[0.0, 1.0]] * len(report.stats["fusion_weights"]) if chosen is None else [[1.0, a] for a in chosen]
    assert report.stats["fusion_weights"] == expected
    assert report.stats["compression"]["max_rank"] == 2 and report.stats["rank_max"] <= 2
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] <= 2


def _by_name_report(cal):
    return {c["name"]: c for c in cal["candidates"]}


def test_cli_calibrated_adapter_merge_then_three_tasks(pair, bases, tmp_path, capsys):
    base, old, new = pair
    third = _checkpoint(make_adapter(base, tmp_path / "THIRD", 13, **LORA), NEW_TEXTS[:3], "third")
    out, out2 = tmp_path / "OUT", tmp_path / "OUT2"
    fast = ["--k", "3", "--max-candidates", "9"]
    assert main(["merge", str(old), str(new), "--calibrate", "--out", str(out), *fast]) == 0
    assert "Calibrated fold (chain)" in capsys.readouterr().out
    assert (out / FINGERPRINTS_DIR).is_dir() and (out / "adapter_model.safetensors").is_file()
    assert main(["merge", str(out), str(third), "--calibrate", "--out", str(out2), *fast]) == 0
    cal = json.loads((out2 / "recall_report.json").read_text())["calibration"]
    assert all(sorted(c["scores"]) == ["new", "old", "third"] for c in cal["candidates"] if not c["pruned"])
    assert sorted(read_fingerprints(out2)) == ["new", "old", "third"]


def test_chain_folds_modules_to_save_of_a_classifier(bases, tmp_path):
    """A BERT classifier's trained head (modules_to_save) is folded as a full tensor; the written adapter, loaded by
    PEFT, scores like the chosen candidate."""
    kw = dict(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"],
              modules_to_save=["classifier"])
    old = _checkpoint(make_adapter(bases["bert"], tmp_path / "OLD", 21, **kw), OLD_TEXTS, "old")
    new = _checkpoint(make_adapter(bases["bert"], tmp_path / "NEW", 22, **kw), NEW_TEXTS, "new")
    report = recall_merge([old, new], None, tmp_path / "o", RecallConfig(k=3, calibrate=True), progress=False)
    cal = report.calibration
    assert read_fingerprints(old)["old"].kind == "classifier" and report.stats["modules_to_save_tensors"] > 0
    cands = _by_name_report(cal)
    assert cands["keep"]["scores"]["old"]["divergence"] < 1e-8 < cands["keep"]["objective"]
    fps = {**read_fingerprints(old), **read_fingerprints(new)}
    model = PeftModel.from_pretrained(load_base(bases["bert"]), tmp_path / "o").eval()
    got = _report_objective(cal, score_tasks(model, fps))
    assert got == pytest.approx(cal["chosen"]["objective"], rel=1e-3, abs=1e-6)


def test_from_base_refuses_full_tensors(bases, tmp_path):
    kw = dict(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"])
    adapter = load_adapter(make_adapter(bases["bert"], tmp_path / "cls", 3, **kw))
    check_calibrate_adapters([adapter, adapter], from_base=False)
    with pytest.raises(ValueError, match="modules_to_save or saved base layers"):
        check_calibrate_adapters([adapter, adapter], from_base=True)
