"""`calibrate` wired into the merge (SPEC 2.7): settings, refusals, `recall-hf task-checkpoint`, the union of
fingerprints an output carries, and `calibrate=False` unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROBES, perturb
from safetensors.torch import load_file

from recall_hf.calibrate import CalibrationConfig, calibrated_fold
from recall_hf.calibrated import check_calibrate
from recall_hf.cli import build_parser, main
from recall_hf.config import RecallConfig
from recall_hf.fingerprint import (
    FINGERPRINT_NAME,
    FINGERPRINTS_DIR,
    collect_fingerprints,
    load_fingerprint,
    read_fingerprints,
)
from recall_hf.merge import execute_merge, prepare_merge, recall_merge
from recall_hf.tiny import build_tiny_model

TEXTS = PROBES + ["the film had a weak plot", "label this message as spam or not", "is the answer yes"]
FAST = ["--k", "3", "--max-candidates", "9"]


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """BASE, PREV (fine-tuned from BASE), NEW and NEW2 (each fine-tuned further), plain folders, and the texts."""
    root = tmp_path_factory.mktemp("stream")
    model, tok = build_tiny_model("llama", texts=PROBES)
    dirs = {"BASE": _save(model, tok, root / "BASE")}
    for i, name in enumerate(("PREV", "NEW", "NEW2")):
        perturb(model, "layers.", scale=0.05, seed=10 + i)
        dirs[name] = _save(model, tok, root / name)
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return root, dirs, texts


@pytest.fixture(scope="module")
def checkpoints(stream):
    """PREV, NEW, NEW2 made task checkpoints by the CLI, each its own task."""
    root, dirs, texts = stream
    for name in ("PREV", "NEW", "NEW2"):
        assert main(["task-checkpoint", str(dirs[name]), "--texts", str(texts), "--task", name.lower(), *FAST]) == 0
    return root, dirs


def _report(out):
    return json.loads((out / "recall_report.json").read_text())


def test_calibrate_setting_reaches_cli_daemon_and_trainer():
    args = build_parser().parse_args(["merge", "a", "b", "--out", "o", "--calibrate"])
    assert args.calibrate is True
    assert build_parser().parse_args(["merge", "a", "b", "--out", "o"]).calibrate is False
    assert RecallConfig().calibrate is False
    from recall_daemon.cli import RECALL_KEYS

    assert "calibrate" in RECALL_KEYS and "calibrate_rule" in RECALL_KEYS
    from recall_hf.trainer import RecallTrainingArguments

    assert {"recall_calibrate", "recall_calibrate_rule"} <= set(RecallTrainingArguments.__dataclass_fields__)
    args = build_parser().parse_args(["merge", "a", "b", "--out", "o", "--calibrate-rule", "mean"])
    assert args.calibrate_rule == "mean"
    assert RecallConfig().calibrate_rule == "minimax"
    with pytest.raises(ValueError, match="calibrate_rule must be one of"):
        RecallConfig(calibrate_rule="median")


def test_refusals_are_one_line(tmp_path, stream):
    _, dirs, _ = stream
    with pytest.raises(ValueError, match="exactly 2 models"):
        check_calibrate("full", [dirs["BASE"], dirs["PREV"], dirs["NEW"]])
    with pytest.raises(ValueError, match="recall-hf task-checkpoint"):
        recall_merge([dirs["PREV"], dirs["BASE"]], PROBES, tmp_path / "o", RecallConfig(k=3, calibrate=True))
    assert not (tmp_path / "o").exists()


def test_task_checkpoint_fingerprint_steps(tmp_path, stream, checkpoints):
    _, dirs, texts = stream
    assert load_fingerprint(dirs["PREV"] / FINGERPRINT_NAME).steps == RecallConfig().fingerprint_steps == 4
    one = shutil.copytree(dirs["BASE"], tmp_path / "one")
    assert main(["task-checkpoint", str(one), "--texts", str(texts), "--fingerprint-steps", "1", *FAST]) == 0
    fp = load_fingerprint(one / FINGERPRINT_NAME)
    assert fp.steps == 1 and fp.topk_logprobs.shape[1] == 1  # the prompt's end only
    with pytest.raises(ValueError, match="fingerprint_steps must be >= 1"):
        RecallConfig(fingerprint_steps=0)


def test_task_checkpoint_refuses_folder_without_weights(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "t.txt").write_text("a text\n")
    assert main(["task-checkpoint", str(tmp_path / "empty"), "--texts", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no weight files" in err and len(err.splitlines()) == 1


def test_calibrate_off_is_unchanged(tmp_path, checkpoints):
    """Inputs carrying fingerprints merge exactly as the plan's rule fuses them; nothing of a task is kept."""
    _, dirs = checkpoints
    config = RecallConfig(k=3)
    report = recall_merge([dirs["PREV"], dirs["NEW"]], None, tmp_path / "a", config, progress=False)
    plan = prepare_merge([dirs["PREV"], dirs["NEW"]], None, tmp_path / "b", config, progress=False)
    explicit = execute_merge(plan, plan.coefficients.clone(), progress=False)
    assert report.weights == explicit.weights and report.calibration is None
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "a" / FINGERPRINTS_DIR).exists()
    assert _report(tmp_path / "a")["calibration"] is None


def test_calibrated_chain_then_three_tasks(tmp_path, checkpoints, capsys):
    _, dirs = checkpoints
    out, out2 = tmp_path / "OUT", tmp_path / "OUT2"
    assert main(["merge", str(dirs["PREV"]), str(dirs["NEW"]), "--out", str(out), "--calibrate", *FAST]) == 0
    assert "Calibrated fold (chain)" in capsys.readouterr().out
    assert sorted(read_fingerprints(out)) == ["new", "prev"]
    cal = _report(out)["calibration"]
    assert cal["protocol"] == "chain" and cal["new_task"] == "new" and cal["timings"]["total"] > 0
    assert cal["rule"] == "minimax" and sorted(cal["scales"]) == sorted(cal["floor"]) == ["new", "prev"]
    assert all(sorted(c["scores"]) == ["new", "prev"] for c in cal["candidates"] if not c["pruned"])
    assert cal["chosen"]["objective"] == min(c["objective"] for c in cal["candidates"])
    assert "text" not in json.dumps(cal)  # scores and coefficients only: no sample texts
    assert main(["merge", str(out), str(dirs["NEW2"]), "--out", str(out2), "--calibrate", "--calibrate-rule", "mean",
                 *FAST]) == 0
    cal2 = _report(out2)["calibration"]
    assert cal2["rule"] == "mean" and cal2["floor"] is None
    assert all(sorted(c["scores"]) == ["new", "new2", "prev"] for c in cal2["candidates"] if not c["pruned"])
    assert sorted(read_fingerprints(out2)) == ["new", "new2", "prev"]


def test_calibrated_chain_fuses_the_chosen_fold(tmp_path, checkpoints):
    """The output is `D + a_l (N - D)` with the chosen coefficients, and the report's weights are those."""
    _, dirs = checkpoints
    report = recall_merge([dirs["PREV"], dirs["NEW"]], None, tmp_path / "o", RecallConfig(k=3, calibrate=True),
                          progress=False)
    d, n = load_file(dirs["PREV"] / "model.safetensors"), load_file(dirs["NEW"] / "model.safetensors")
    out = load_file(tmp_path / "o" / "model.safetensors")
    name = next(k for k in out if "layers.1." in k and torch.is_floating_point(out[k]))
    a = report.weights[2][1]  # layer 2 = block 1
    assert a == report.calibration["chosen"]["coefficients"][2]
    assert torch.allclose(out[name], d[name] + a * (n[name] - d[name]), atol=1e-5)
    assert report.stats["planned_weights"] and report.stats["fingerprints"] == ["new", "prev"]


def test_calibrated_merge_scores_both_endpoints_in_the_representation_pass(tmp_path, checkpoints):
    """On the new task's own typical samples, the replays that score D and N also give RECALL's representations:
    the search reuses those endpoint scores (equal to its own), chooses the same fold, and the plan's coefficients
    are the plain pass's up to float noise. Other probes take the usual path."""
    _, dirs = checkpoints
    config = RecallConfig(k=3, calibrate=True)
    plan = prepare_merge([dirs["PREV"], dirs["NEW"]], None, tmp_path / "o", config, progress=False)
    assert sorted(plan.strategy.endpoints) == ["keep", "new"]
    plain = prepare_merge([dirs["PREV"], dirs["NEW"]], None, tmp_path / "p", RecallConfig(k=3), progress=False)
    plain.strategy.close()
    assert plain.strategy.endpoints is None
    assert torch.allclose(plan.coefficients, plain.coefficients, atol=1e-4)
    cal = execute_merge(plan, progress=False).calibration
    alone = calibrated_fold(dirs["PREV"], dirs["NEW"], collect_fingerprints(dirs["PREV"], dirs["NEW"]), "new",
                            profile=plan.coefficients[:, -1], config=CalibrationConfig(batch_size=config.batch_size))
    assert cal["endpoints_scored"] == "beforehand" and alone.report["endpoints_scored"] == "in the search"
    fused, searched = ({c["name"]: c for c in r["candidates"]} for r in (cal, alone.report))
    for end in ("keep", "new"):
        assert fused[end]["scores"] == searched[end]["scores"]
    assert cal["chosen"]["name"] == alone.report["chosen"]["name"]
    other = recall_merge([dirs["PREV"], dirs["NEW"]], PROBES[:2], tmp_path / "q", config, progress=False)
    assert other.calibration["endpoints_scored"] == "in the search"


def test_calibrated_from_base(tmp_path, checkpoints):
    _, dirs = checkpoints
    out = tmp_path / "FB"
    assert main(["merge", str(dirs["PREV"]), str(dirs["NEW"]), "--out", str(out), "--calibrate",
                 "--base", str(dirs["BASE"]), *FAST]) == 0
    report = _report(out)
    assert report["calibration"]["protocol"] == "from-base"
    assert report["stats"]["fusion_inputs"][0] == str(dirs["BASE"])
    assert len(report["stats"]["fusion_weights"][0]) == 3
    assert report["calibration"]["endpoints_scored"] == "beforehand"
