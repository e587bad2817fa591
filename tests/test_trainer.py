"""Continual runs through the Trainer stack: callback + merge_into, RecallTrainer, run_task_sequence, SFTTrainer."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from recall_hf import RecallCallback, RecallConfig, RecallTrainer, RecallTrainingArguments, run_task_sequence
from recall_hf.fingerprint import read_fingerprints
from recall_hf.layers import LayerMap
from recall_hf.modeldir import READY, REPORT_NAME, read_recall_json
from recall_hf.samples import SAMPLES_NAME
from recall_hf.tiny import build_tiny_model

MOVIE = "movie film actor scene plot story great boring long short funny sad music ending".split()
EMAIL = "email offer free money click link account password bank prize winner urgent reply".split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(n)]


TASKS = {"movies": sentences(MOVIE, 20, 0), "emails": sentences(EMAIL, 20, 1)}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trainer") / "base"
    build_tiny_model("llama", path, texts=MOVIE + EMAIL + ["user assistant yes no"])
    return path


def tokenized(tok, texts: list[str]) -> Dataset:
    return Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True)


def train_args(cls=TrainingArguments, **kwargs):
    return cls(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], disable_tqdm=True,
               save_strategy="no", use_cpu=True, **kwargs)


def plain_trainer(init: Path, name: str, texts: list[str], out: Path, callbacks=()) -> Trainer:
    tok, model = AutoTokenizer.from_pretrained(init), AutoModelForCausalLM.from_pretrained(init)
    return Trainer(model, train_args(output_dir=str(out)), train_dataset=tokenized(tok, texts),
                   processing_class=tok, callbacks=list(callbacks),
                   data_collator=DataCollatorForLanguageModeling(tok, mlm=False))


def assert_merged_by_report(merged: Path, inputs: list[Path]) -> dict:
    """Every merged tensor is the report's per-layer convex combination of the inputs' tensors."""
    report = json.loads((merged / REPORT_NAME).read_text())
    weights = torch.tensor(report["weights"], dtype=torch.float64)
    assert torch.allclose(weights.sum(dim=1), torch.ones(len(weights), dtype=torch.float64))
    layer_map = LayerMap.from_pretrained(merged)
    out = load_file(merged / "model.safetensors")
    ins = [load_file(d / "model.safetensors") for d in inputs]
    assert set(out) == set(ins[0])
    layers_seen = set()
    for name, tensor in out.items():
        layer = layer_map.layer_of(name)
        layers_seen.add(layer)
        expected = sum(weights[layer, k] * ins[k][name].double() for k in range(len(ins)))
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name
    assert layers_seen == set(range(len(weights)))
    return report


def test_callback_merge_into_two_tasks(base_dir, tmp_path):
    merged = tmp_path / "merged"
    checkpoints, trainers = [], []
    for i, (name, texts) in enumerate(TASKS.items()):
        callback = RecallCallback(drop_dir=tmp_path / "drop", merge_into=merged, config=RecallConfig(k=4),
                                  task_name=name, progress=False)
        init = base_dir if i == 0 else merged
        trainer = plain_trainer(init, name, texts, tmp_path / f"out_{name}", [callback])
        trainer.train()
        checkpoints.append(callback.checkpoint_dir)
        trainers.append(trainer)
        assert callback.merged_dir == merged.resolve()
    # Step 1: the first task checkpoint became the merged model; step 2: RECALL of it and the second one.
    assert merged.is_symlink() and merged.resolve().name == "v0002"
    assert [p.name for p in merged.resolve().parent.iterdir()] == ["v0002"]  # only the rolling model is kept
    report = assert_merged_by_report(merged, checkpoints)
    assert report["task_counts"] == [1, 1] and read_recall_json(merged)["task_count"] == 2
    assert not (merged / READY).exists() and not (merged / SAMPLES_NAME).exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.num_hidden_layers == 4
    # Task 2 trained from the merged model of step 1, and said so.
    meta = read_recall_json(checkpoints[1])
    assert meta["parent"].endswith("v0001") and meta["base"] == str(base_dir.resolve())
    # The per-layer weights reached the trainer's log (and through it, every reporting integration).
    logged = [h for h in trainers[1].state.log_history if "recall/newest_weight/layer_00" in h]
    assert len(logged) == 1
    newest = [logged[0][f"recall/newest_weight/layer_{layer:02d}"] for layer in range(5)]
    assert newest == pytest.approx([row[-1] for row in report["weights"]])
    assert logged[0]["recall/task_count"] == 2
    assert len(list((tmp_path / "drop").iterdir())) == 2


def test_callback_merge_into_with_calibrate_folds_the_chosen_fold_and_keeps_both_fingerprints(base_dir, tmp_path):
    """`merge_into` with `calibrate=True`: the second task is folded by the calibrated search (chain form, endpoints
    scored in the representation pass), the version is `D + a_l (N - D)` with the chosen coefficients, and it
    carries both tasks' fingerprints for the next fold."""
    merged, checkpoints = tmp_path / "merged", []
    config = RecallConfig(k=4, calibrate=True)
    for i, (name, texts) in enumerate(TASKS.items()):
        callback = RecallCallback(merge_into=merged, config=config, task_name=name, progress=False)
        plain_trainer(base_dir if i == 0 else merged, name, texts, tmp_path / f"out_{name}", [callback]).train()
        checkpoints.append(callback.checkpoint_dir)
    assert sorted(read_fingerprints(checkpoints[0])) == ["movies"]
    report = assert_merged_by_report(merged, checkpoints)
    cal = report["calibration"]
    assert cal["protocol"] == "chain" and cal["new_task"] == "emails" and cal["endpoints_scored"] == "beforehand"
    chosen = torch.tensor(cal["chosen"]["coefficients"], dtype=torch.float64)
    assert torch.allclose(torch.tensor(report["weights"], dtype=torch.float64)[:, 1], chosen)
    assert sorted(read_fingerprints(merged)) == ["emails", "movies"]


def test_recall_trainer(base_dir, tmp_path):
    merged = tmp_path / "merged"
    checkpoints = []
    for i, (name, texts) in enumerate(TASKS.items()):
        init = base_dir if i == 0 else merged
        tok, model = AutoTokenizer.from_pretrained(init), AutoModelForCausalLM.from_pretrained(init)
        args = train_args(RecallTrainingArguments, output_dir=str(tmp_path / f"run_{name}"), run_name=name,
                          recall_drop_dir=str(tmp_path / "drop"), recall_merge_into=str(merged), recall_k=3,
                          recall_tau=0.3)
        trainer = RecallTrainer(model, args, train_dataset=tokenized(tok, texts), processing_class=tok,
                                data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        assert trainer.recall_callback.trainer is trainer
        assert trainer.recall_callback.config.tau == 0.3 and trainer.recall_callback.config.k == 3
        trainer.train()
        checkpoints.append(trainer.recall_callback.checkpoint_dir)
        assert read_recall_json(checkpoints[-1])["task"] == name
        assert len((checkpoints[-1] / SAMPLES_NAME).read_text().splitlines()) == 3
    report = assert_merged_by_report(merged, checkpoints)
    assert report["config"]["tau"] == 0.3
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "drop").iterdir()) == ["emails", "movies"]


def test_recall_training_arguments():
    parser = HfArgumentParser(RecallTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--recall_k", "5", "--recall_similarity",
                                                  "cosine", "--use_cpu", "True"])
    config = args.recall_config()
    assert (config.k, config.similarity, config.tau, config.device) == (5, "cosine", RecallConfig().tau, "cpu")
    # Every RecallConfig field is an argument (generated from it: fusion, mode and dtype included), and sample
    # selection is seeded like RecallCallback's (RecallConfig.seed), not by the training seed.
    assert {f"recall_{f.name}" for f in dataclasses.fields(RecallConfig)} <= {
        f.name for f in dataclasses.fields(RecallTrainingArguments)}
    argv = ["--output_dir", "o", "--recall_fusion", "task_vector", "--recall_mode", "multi", "--recall_dtype",
            "bfloat16", "--seed", "7", "--use_cpu", "True"]
    (args,) = parser.parse_args_into_dataclasses(argv)
    config = args.recall_config()
    assert (config.fusion, config.mode, config.dtype, config.seed) == ("task_vector", "multi", "bfloat16", 0)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--recall_fusion", "sum"])
    with pytest.raises(ValueError, match="rbf"):
        RecallTrainingArguments(output_dir="o", recall_similarity="nope")
    with pytest.raises(ValueError, match="somewhere"):
        RecallTrainingArguments(output_dir="o", recall_save_to_output_dir=False)
    with pytest.raises(TypeError, match="RecallTrainingArguments"):
        RecallTrainer(torch.nn.Linear(2, 2), TrainingArguments(output_dir="o", use_cpu=True))


def test_run_task_sequence(base_dir, tmp_path):
    def make_trainer(init, name, texts, out):
        # A RecallCallback added here is replaced by run_task_sequence's own.
        return plain_trainer(init, name, texts, out, [RecallCallback(drop_dir=tmp_path / "unused")])

    steps = run_task_sequence(base_dir, list(TASKS.items()), make_trainer, tmp_path / "work",
                              RecallConfig(k=3), chain=True, progress=False)
    assert [s.task for s in steps] == list(TASKS)
    assert steps[0].init_model == base_dir and steps[1].init_model.name == "v0001"
    assert steps[0].report is None and steps[1].report is not None
    assert steps[1].merged == (tmp_path / "work" / "merged").resolve()
    assert_merged_by_report(steps[1].merged, [s.checkpoint for s in steps])
    assert steps[0].checkpoint == tmp_path / "work" / "01-movies" / "_recall_checkpoint"
    assert not (tmp_path / "unused").exists()


def test_sft_trainer_chat_messages(base_dir, tmp_path):
    trl = pytest.importorskip("trl")
    tok, model = AutoTokenizer.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(base_dir)
    tok.chat_template = CHAT_TEMPLATE
    questions = sentences(MOVIE, 16, 3)
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": q}, {"role": "assistant",
                                                                            "content": "yes" if i % 2 else "no"}]
                                            for i, q in enumerate(questions)]})
    callback = RecallCallback(drop_dir=tmp_path / "drop", config=RecallConfig(k=4), progress=False)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                         report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True, max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[callback])
    trainer.train()
    samples = [json.loads(line) for line in (callback.drop_path / SAMPLES_NAME).read_text().splitlines()]
    # Prompt side only, rendered with the chat template and the generation prompt: no answers.
    assert len(samples) == 4
    assert {s["text"] for s in samples} <= {f"user: {q}\nassistant:" for q in questions}
    assert read_recall_json(callback.drop_path)["task"] == "sft"
    assert any("recall/num_samples" in h for h in trainer.state.log_history)
