"""Inputs as Hub ids (from an offline cache the test builds), `--base` against recorded parent hashes, and a
trainer's output_dir pointed to its task checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import PROBES
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from recall_hf import RecallConfig, recall_merge
from recall_hf.card import CARD_NAME
from recall_hf.hub import hub_id_of, input_labels, looks_like_hub_id, resolve_model
from recall_hf.lineage import check_lineage
from recall_hf.lora.fold import fold_adapter
from recall_hf.task_checkpoint import write_task_checkpoint
from recall_hf.tiny import build_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """Lay `src`'s files out as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy2(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HOME in tmp_path, offline: only what the test puts in the cache exists."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def make_adapter(base_dir: Path, out: Path, seed: int, base_name: str) -> Path:
    cfg = transformers.AutoConfig.from_pretrained(base_dir)
    model = getattr(transformers, cfg.architectures[0]).from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(out)
    return out


def as_task(adapter: Path, out: Path, task: str, parent: Path | str) -> Path:
    samples = [{"text": t, "cluster": i, "cluster_size": 1} for i, t in enumerate(PROBES[:3])]
    return write_task_checkpoint(adapter, None, out, samples, task, parent=parent)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_bases")
    build_tiny_model("llama", root / "base", texts=PROBES, layers=2)
    build_tiny_model("llama", root / "other", texts=PROBES, layers=2, seed=1)
    return root / "base", root / "other"


def test_hub_id_recognition(tmp_path):
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M") and looks_like_hub_id("gpt2")
    assert not looks_like_hub_id("./models/a") and not looks_like_hub_id("/abs/a") and not looks_like_hub_id("a/b/c")
    snapshot = put_in_cache(tmp_path / "hub", "org/name", tmp_path / "hub")  # empty snapshot is enough here
    assert hub_id_of(snapshot) == "org/name" and hub_id_of("org/name") == "org/name"
    assert hub_id_of(tmp_path) is None


def test_missing_hub_id_is_one_line_error(hub_cache):
    with pytest.raises(ValueError, match=r"'org/absent' is not a local directory.*not in the local cache") as err:
        resolve_model("org/absent")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist .*not a Hub model id"):
        resolve_model("./no/such/dir")


def test_adapter_merge_from_hub_ids(bases, hub_cache, tmp_path):
    """Adapters and their base only in the offline cache: merged by id; the card names the base by its id."""
    base, _ = bases
    put_in_cache(hub_cache, "tiny-org/llama", base)
    for k, seed in (("a", 1), ("b", 2)):
        adapter = make_adapter(base, tmp_path / f"raw_{k}", seed, "tiny-org/llama")
        put_in_cache(hub_cache, f"tiny-org/task-{k}", as_task(adapter, tmp_path / k, f"task-{k}", "tiny-org/llama"))
    report = recall_merge(["tiny-org/task-a", "tiny-org/task-b"], None, tmp_path / "out", RecallConfig(k=3),
                          progress=False)
    assert [hub_id_of(m) for m in report.models] == ["tiny-org/task-a", "tiny-org/task-b"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/llama"
    data = ModelCard.load(tmp_path / "out" / CARD_NAME).data.to_dict()
    assert data["base_model"] == "tiny-org/llama" and data["library_name"] == "peft"
    assert data["recall"]["tasks"] == ["task-a", "task-b"]
    folded = fold_adapter(tmp_path / "out", tmp_path / "folded", base="tiny-org/llama")
    data = ModelCard.load(folded / CARD_NAME).data.to_dict()
    assert data["base_model"] == "tiny-org/llama" and data["library_name"] == "transformers"
    assert data["recall"]["tasks"] == ["task-a", "task-b"]


def test_cli_merges_hub_ids_offline(model_pair, tmp_path):
    """The CLI entry, in a fresh process whose HF_HOME is a cache built in tmp_path."""
    a, b = model_pair["gpt2"]
    cache = tmp_path / "hf" / "hub"
    put_in_cache(cache, "org/a", a)
    put_in_cache(cache, "org/b", b)
    probes = tmp_path / "probes.txt"
    probes.write_text("\n".join(PROBES))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "recall_hf.cli", "merge", "org/a", "org/b", "--probes", str(probes),
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "recall_report.json").read_text())
    assert [hub_id_of(m) for m in report["models"]] == ["org/a", "org/b"]
    missing = subprocess.run([sys.executable, "-m", "recall_hf.cli", "merge", "org/a", "org/zzz", "--out",
                              str(tmp_path / "out2")], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "'org/zzz' is not a local directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_wrong_base_is_refused_in_one_line(bases, tmp_path):
    base, other = bases
    tasks = [as_task(make_adapter(base, tmp_path / f"raw{k}", k, str(base)), tmp_path / f"t{k}", f"t{k}", base)
             for k in (1, 2)]
    check_lineage(tasks, base)  # the right base passes
    with pytest.raises(ValueError, match=r"--base .*other is not the model .*t1 was trained from: .*model\."
                                         r"safetensors sha256") as err:
        recall_merge(tasks, None, tmp_path / "out", RecallConfig(k=3), base=other, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is not the model"):
        fold_adapter(tasks[0], tmp_path / "folded", base=other)


def test_trainer_output_dir_points_to_its_task_checkpoint(bases, tmp_path):
    base, _ = bases
    task = as_task(make_adapter(base, tmp_path / "raw", 1, str(base)), tmp_path / "t", "t", base)
    output_dir = tmp_path / "trainer_out"
    output_dir.mkdir()
    shutil.copytree(task, output_dir / "_recall_checkpoint")
    with pytest.raises(ValueError, match=rf"the task checkpoint is in {output_dir / '_recall_checkpoint'}"):
        recall_merge([task, output_dir], None, tmp_path / "out", progress=False)


def test_input_labels_tell_apart_inputs_with_one_folder_name(tmp_path):
    snapshot = put_in_cache(tmp_path / "hub", "org/model", tmp_path / "hub")
    a, b = tmp_path / "run_a" / "_recall_checkpoint", tmp_path / "run_b" / "_recall_checkpoint"
    assert input_labels([a, b, snapshot]) == ["run_a/_recall_checkpoint", "run_b/_recall_checkpoint", "org/model"]
    assert input_labels([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]
